"""SQLite backend: one database file in WAL mode, safe for several processes of one host.

Writers take the database lock up front (``BEGIN IMMEDIATE``) so two processes never deadlock upgrading a
read lock, and wait up to ``busy_timeout`` for each other. The default ``synchronous="full"`` makes every
committed transaction survive a crash of the process or the machine; ``"normal"`` (about two orders of
magnitude faster per write on a disk with slow fsync) still survives a killed process, but an OS crash or
power loss may drop the last commits. The file is created 0600.

An existing deployment's file is never replaced: only ``create=True`` (``fedfer-aggregator init``) makes a new
database. Otherwise a missing or empty (0-byte) file, a file that is not SQLite, a truncated file, one that
fails SQLite's ``quick_check``, or one without the fedfer schema is refused with a message saying which, and
left exactly as found. Every SQLite failure afterwards is one of the storage errors: a full disk
:class:`~fedfer.aggregator.storage.base.StorageFullError`, a busy or failing disk
:class:`~fedfer.aggregator.storage.base.StorageUnavailableError`, a damaged file or record
:class:`~fedfer.aggregator.storage.base.StorageCorruptError`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

from fedfer.aggregator.storage.base import (
    StorageCorruptError,
    StorageError,
    StorageFullError,
    StorageUnavailableError,
)
from fedfer.aggregator.storage.sql import Cursor, SqlStorage

__all__ = ["SqliteStorage"]

_WAL_RETRY_S = 0.01
_MAGIC = b"SQLite format 3\x00"
_HEADER_BYTES = 100
_KEPT = (
    "the file is kept as it is; restore it from a backup, or run `fedfer-aggregator init` in a new directory "
    "for a new deployment"
)


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


def storage_error(exc: BaseException) -> StorageError:
    """The storage error an SQLite failure (or a value it could not decode) stands for."""
    name = str(getattr(exc, "sqlite_errorname", ""))
    if name == "SQLITE_FULL":
        return StorageFullError("the disk holding the SQLite database is full; nothing was written")
    undecodable = isinstance(exc, UnicodeDecodeError) or str(exc).startswith("Could not decode to UTF-8")
    if undecodable or name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")):
        return StorageCorruptError(f"the SQLite database is damaged ({name or 'undecodable text'})")
    if isinstance(exc, sqlite3.OperationalError):
        return StorageUnavailableError(f"SQLite operation failed: {name or 'error'}")
    if isinstance(exc, sqlite3.DatabaseError):
        return StorageCorruptError(f"the SQLite database is damaged ({name or type(exc).__name__})")
    return StorageError(f"SQLite operation failed: {name or type(exc).__name__}")


def _check_file(path: Path, *, create: bool) -> None:
    """Refuse, without touching it, a file that cannot be an existing deployment's database."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        if create:
            return
        raise StorageError(
            f"no SQLite database at {path}: refusing to start an empty deployment (a deployment's database "
            "is created by `fedfer-aggregator init`)"
        ) from None
    except OSError as exc:
        raise StorageUnavailableError(f"cannot read the SQLite database: {exc.strerror}") from None
    if size == 0:
        if create:
            return
        raise StorageCorruptError(
            f"the SQLite database {path} is empty (0 bytes): refusing to start an empty deployment over "
            f"it; {_KEPT}"
        )
    try:
        with path.open("rb") as fh:
            header = fh.read(_HEADER_BYTES)
    except OSError as exc:
        raise StorageUnavailableError(f"cannot read the SQLite database: {exc.strerror}") from None
    if len(header) < _HEADER_BYTES or header[:16] != _MAGIC:
        raise StorageCorruptError(f"{path} is not an SQLite database (damaged or overwritten); {_KEPT}")
    page_size = int.from_bytes(header[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    pages = int.from_bytes(header[28:32], "big")
    header_valid = header[24:28] == header[92:96] and pages > 0
    if page_size < 512 or page_size & (page_size - 1) or size % page_size:
        raise StorageCorruptError(
            f"the SQLite database {path} is truncated or damaged ({size} bytes); {_KEPT}"
        )
    if header_valid and size < pages * page_size:
        raise StorageCorruptError(
            f"the SQLite database {path} is truncated ({size} of {pages * page_size} bytes); {_KEPT}"
        )


class SqliteStorage(SqlStorage):
    """:class:`~fedfer.aggregator.storage.base.Storage` over one SQLite file.

    Args:
        path: Database file; its directory must exist. Created 0600 if missing and ``create`` is set.
        busy_timeout_s: How long a writer waits for another process's transaction.
        synchronous: ``"full"`` (default, durable across power loss) or ``"normal"`` (durable across a killed
            process only).
        now: Clock reading recorded with applied migrations (the storage never reads the clock itself).
        create: Make a new database if the file is missing or empty (only a new deployment does this);
            otherwise such a file is refused.

    Raises:
        StorageError: the file is missing, empty, not SQLite, truncated, damaged or without the fedfer schema
            (:class:`~fedfer.aggregator.storage.base.StorageCorruptError` for the damaged cases), or cannot be
            opened. The file is left as it was.
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
        create: bool = False,
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
        _check_file(self._path, create=create)
        try:
            if create:
                # Created here so it is 0600 from the start (SQLite copies the mode to -wal/-shm).
                fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
                os.close(fd)
            self._conn = sqlite3.connect(
                f"{self._path.resolve().as_uri()}?mode=rw",
                uri=True,
                timeout=busy_timeout_s,
                isolation_level=None,
                check_same_thread=False,
            )
        except (OSError, sqlite3.Error) as exc:
            raise StorageUnavailableError(f"cannot open SQLite database: {type(exc).__name__}") from None
        try:
            self._configure(busy_timeout_s, synchronous)
            self._migrate(now, create=create)
        except BaseException:
            self._conn.close()
            raise

    def _configure(self, busy_timeout_s: float, synchronous: str) -> None:
        try:
            self._conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
            mode = _enter_wal(self._conn, busy_timeout_s)
            if mode != "wal":
                raise StorageError("SQLite refused WAL mode for this file")
            level = "FULL" if synchronous == "full" else "NORMAL"
            self._conn.execute(f"PRAGMA synchronous = {level}")
            self._conn.execute("PRAGMA foreign_keys = ON")
            problems = [str(r[0]) for r in self._conn.execute("PRAGMA quick_check(3)").fetchall()]
        except (sqlite3.Error, UnicodeDecodeError) as exc:
            error = storage_error(exc)
            if isinstance(error, StorageCorruptError):
                raise StorageCorruptError(f"{self._path}: {error}; {_KEPT}") from None
            raise error from None
        if problems != ["ok"]:
            first = " ".join(problems[0].split())[:160]  # SQLite's report, on one line
            raise StorageCorruptError(
                f"the SQLite database {self._path} fails its integrity check ({first}); {_KEPT}"
            )

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
                with contextlib.suppress(sqlite3.Error):
                    self._conn.rollback()
                raise
            cur.execute("COMMIT")
        except sqlite3.IntegrityError:
            raise  # a constraint refused the write: callers turn it into ConflictError
        except (sqlite3.Error, UnicodeDecodeError) as exc:
            if self._conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    self._conn.rollback()
            raise storage_error(exc) from exc
        finally:
            cur.close()

    def _is_integrity_error(self, exc: BaseException) -> bool:
        return isinstance(exc, sqlite3.IntegrityError)

    def _close_connection(self) -> None:
        self._conn.close()

    def _lock_schema(self, cur: Cursor) -> None:
        # BEGIN IMMEDIATE already holds the write lock.
        return None

    def _schema_exists(self, cur: Cursor) -> bool:
        cur.execute("SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations'")
        return bool(cur.fetchone()[0])

    def _no_schema_message(self) -> str:
        return (
            f"the SQLite database {self._path} holds no fedfer schema: refusing to start an empty "
            f"deployment; {_KEPT}"
        )
