"""PostgreSQL backend (psycopg 3) for several aggregator replicas sharing one population.

Each :class:`PostgresStorage` holds one connection guarded by a lock; transactions run at READ COMMITTED,
which is enough because every racing write is a single constrained statement or a compare-and-set. Schema
migrations take a transaction-scoped advisory lock so replicas starting together migrate once. A broken
connection is replaced on the next call.

Only ``create=True`` (``fedfer-aggregator create-storage``) puts the schema into a database that has none;
an existing deployment pointed at an empty or replaced database refuses to start. A full disk is
:class:`~fedfer.aggregator.storage.base.StorageFullError`, a lost connection or other operational failure
:class:`~fedfer.aggregator.storage.base.StorageUnavailableError`, data the server reports corrupt
:class:`~fedfer.aggregator.storage.base.StorageCorruptError`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Iterator, Sequence
from typing import Any

import psycopg

from fedfer.aggregator.storage.base import (
    StorageCorruptError,
    StorageError,
    StorageFullError,
    StorageUnavailableError,
)
from fedfer.aggregator.storage.sql import Cursor, SqlStorage

__all__ = ["PostgresStorage"]

_SCHEMA_LOCK = 0x66656466  # "fedf": advisory lock key for migrations


def storage_error(exc: psycopg.Error) -> StorageError:
    """The storage error a psycopg failure stands for (class names only: libpq text can echo the URL)."""
    if isinstance(exc, psycopg.errors.DiskFull):
        return StorageFullError("the PostgreSQL server's disk is full; nothing was written")
    if isinstance(exc, psycopg.errors.DataCorrupted | psycopg.errors.IndexCorrupted):
        return StorageCorruptError(f"the PostgreSQL server reports damaged data ({type(exc).__name__})")
    if isinstance(exc, psycopg.OperationalError):
        return StorageUnavailableError(f"PostgreSQL operation failed: {type(exc).__name__}")
    return StorageError(f"PostgreSQL operation failed: {type(exc).__name__}")


class _PgCursor:
    """Adapts a psycopg cursor to the shared ``?``-placeholder queries."""

    def __init__(self, cur: psycopg.Cursor[Any]) -> None:
        self._cur = cur

    @property
    def rowcount(self) -> int:
        return self._cur.rowcount

    def execute(self, sql: str, params: Sequence[Any] = (), /) -> Any:
        return self._cur.execute(sql.replace("?", "%s"), tuple(params))

    def fetchone(self) -> Any:
        return self._cur.fetchone()

    def fetchall(self) -> Any:
        return self._cur.fetchall()


class PostgresStorage(SqlStorage):
    """:class:`~fedfer.aggregator.storage.base.Storage` over a PostgreSQL database.

    Args:
        url: libpq connection string (``postgresql://user@host:port/dbname``).
        connect_timeout_s: Seconds to wait for the server when (re)connecting.
        now: Clock reading recorded with applied migrations.
        create: Put the schema into a database that has none (a new deployment); otherwise such a database
            is refused.
    """

    _blob_type = "BYTEA"
    _autoid_type = "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY"

    def __init__(
        self, url: str, *, connect_timeout_s: float = 10.0, now: dt.datetime, create: bool = False
    ) -> None:
        super().__init__()
        if type(url) is not str or not url.startswith(("postgresql://", "postgres://")):
            raise StorageError("PostgreSQL URL must start with postgresql://")
        if isinstance(connect_timeout_s, bool) or not isinstance(connect_timeout_s, int | float):
            raise StorageError("connect_timeout_s must be a positive number")
        if connect_timeout_s <= 0:
            raise StorageError("connect_timeout_s must be a positive number")
        self._url = url
        self._timeout = max(1, int(connect_timeout_s))
        self._conn: psycopg.Connection[Any] | None = None
        self._connect()
        try:
            self._migrate(now, create=create)
        except BaseException:
            self._close_connection()
            raise

    def __repr__(self) -> str:
        return "PostgresStorage(<url redacted>)"

    def _connect(self) -> psycopg.Connection[Any]:
        if self._conn is not None and not self._conn.closed and not self._conn.broken:
            return self._conn
        try:
            self._conn = psycopg.connect(self._url, autocommit=True, connect_timeout=self._timeout)
        except psycopg.Error as exc:
            # libpq messages can echo parts of the URL; keep only the class name.
            raise StorageUnavailableError(f"cannot connect to PostgreSQL: {type(exc).__name__}") from None
        return self._conn

    @contextlib.contextmanager
    def _begin(self, *, write: bool) -> Iterator[Cursor]:
        try:
            with self._transaction() as cur:
                yield cur
        except psycopg.errors.IntegrityError:
            raise  # a constraint refused the write: callers turn it into ConflictError
        except psycopg.Error as exc:  # raised by a statement or by the commit
            raise storage_error(exc) from None

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[Cursor]:
        with contextlib.ExitStack() as stack:
            conn = self._connect()
            try:
                stack.enter_context(conn.transaction())
            except psycopg.OperationalError:
                # The server dropped an idle connection (restart, failover, idle timeout). Nothing has run
                # in this transaction yet, so reconnecting once and starting again is safe.
                self._close_connection()
                conn = self._connect()
                try:
                    stack.enter_context(conn.transaction())
                except psycopg.OperationalError as exc:
                    raise storage_error(exc) from None
            cur = stack.enter_context(conn.cursor())
            yield _PgCursor(cur)

    def _is_integrity_error(self, exc: BaseException) -> bool:
        return isinstance(exc, psycopg.errors.IntegrityError)

    def _close_connection(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error):
                self._conn.close()
            self._conn = None

    def _lock_schema(self, cur: Cursor) -> None:
        cur.execute("SELECT pg_advisory_xact_lock(?)", (_SCHEMA_LOCK,))

    def _schema_exists(self, cur: Cursor) -> bool:
        cur.execute("SELECT to_regclass('schema_migrations') IS NOT NULL")
        return bool(cur.fetchone()[0])

    def _no_schema_message(self) -> str:
        return (
            "the PostgreSQL database holds no fedfer schema: refusing to start an empty deployment (a "
            "deployment's database schema is created by `fedfer-aggregator create-storage DIR`)"
        )
