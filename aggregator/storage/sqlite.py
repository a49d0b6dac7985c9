"""SQLite backend: one database file in WAL mode, safe for several processes of one host.

Writers take the database lock up front (``BEGIN IMMEDIATE``) so two processes never deadlock upgrading a
read lock, and wait up to ``busy_timeout`` for each other. The default ``synchronous="full"`` makes every
committed transaction survive a crash of the process or the machine; ``"normal"`` (about two orders of
magnitude faster per write on a disk with slow fsync) still survives a killed process, but an OS crash or
power loss may drop the last commits. The file is created 0600.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

from fedfer.aggregator.storage.base import StorageError
from fedfer.aggregator.storage.sql import Cursor, SqlStorage

__all__ = ["SqliteStorage"]

_WAL_RETRY_S = 0.01


def _enter_wal(conn: sqlite3.Connection, timeout_s: float) -> str:
    """Switch the file to WAL mode and return the journal mode SQLite reports.

    Changing the journal mode needs an exclusive lock for which SQLite does not call its busy handler, so when
    several processes open a new file at once one of them gets ``SQLITE_BUSY`` at once; retry until the same
    deadline a writer would wait for.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return str(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]).lower()
        except sqlite3.OperationalError as exc:
            busy = getattr(exc, "sqlite_errorname", "") in ("SQLITE_BUSY", "SQLITE_LOCKED")
            if not busy or time.monotonic() >= deadline:
                raise
            time.sleep(_WAL_RETRY_S)


class SqliteStorage(SqlStorage):
    """:class:`~fedfer.aggregator.storage.base.Storage` over one SQLite file.

    Args:
        path: Database file; its directory must exist. Created 0600 if missing.
        busy_timeout_s: How long a writer waits for another process's transaction.
        synchronous: ``"full"`` (default, durable across power loss) or ``"normal"`` (durable across a killed
            process only).
        now: Clock reading recorded with applied migrations (the storage never reads the clock itself).
    """

    _blob_type = "BLOB"
    _autoid_type = "INTEGER PRIMARY KEY AUTOINCREMENT"

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        busy_timeout_s: float = 10.0,
        synchronous: str = "full",
        now: dt.datetime,
    ) -> None:
        super().__init__()
        if synchronous not in ("full", "normal"):
            raise StorageError("synchronous must be 'full' or 'normal'")
        if (
            not isinstance(busy_timeout_s, int | float)
            or isinstance(busy_timeout_s, bool)
            or busy_timeout_s <= 0
        ):
            raise StorageError("busy_timeout_s must be a positive number")
        self._path = Path(path)
        if not self._path.parent.is_dir():
            raise StorageError("the SQLite database's directory does not exist")
        try:
            # Create the file ourselves so it is 0600 from the start (SQLite copies its mode to -wal/-shm).
            fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
            os.close(fd)
            self._conn = sqlite3.connect(
                self._path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
            )
            self._conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
            mode = _enter_wal(self._conn, busy_timeout_s)
            if mode != "wal":
                raise StorageError("SQLite refused WAL mode for this file")
            level = "FULL" if synchronous == "full" else "NORMAL"
            self._conn.execute(f"PRAGMA synchronous = {level}")
            self._conn.execute("PRAGMA foreign_keys = ON")
        except (OSError, sqlite3.Error) as exc:
            raise StorageError(f"cannot open SQLite database: {type(exc).__name__}") from exc
        try:
            self._migrate(now)
        except BaseException:
            self._conn.close()
            raise

    @property
    def path(self) -> Path:
        """The database file."""
        return self._path

    def __repr__(self) -> str:
        return f"SqliteStorage({str(self._path)!r})"

    @contextlib.contextmanager
    def _begin(self, *, write: bool) -> Iterator[Cursor]:
        cur = self._conn.cursor()
        try:
            cur.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield cur
            except BaseException:
                self._conn.rollback()
                raise
            cur.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            if self._conn.in_transaction:
                self._conn.rollback()
            raise StorageError(
                f"SQLite operation failed: {getattr(exc, 'sqlite_errorname', 'error')}"
            ) from exc
        finally:
            cur.close()

    def _is_integrity_error(self, exc: BaseException) -> bool:
        return isinstance(exc, sqlite3.IntegrityError)

    def _close_connection(self) -> None:
        self._conn.close()

    def _lock_schema(self, cur: Cursor) -> None:
        # BEGIN IMMEDIATE already holds the write lock.
        return None
