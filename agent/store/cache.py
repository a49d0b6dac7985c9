"""The encrypted feature cache: an SQLite index (WAL) of AES-256-GCM records under per-session data keys.

Nothing but ciphertext and non-secret bookkeeping (session id, creation time, counts, sizes) reaches disk:

* A key-encryption key (KEK) lives in a :class:`~fedfer.agent.store.keys.KeyStore` (a 0600 file, or the OS
  keyring).
* Each session gets its own data key (DEK), stored only wrapped under the KEK, bound to (cache id, session)
  and to the session's state: an open session's key is bound to its id, a sealed session's key to its id
  and "sealed". The ``sealed`` flag of the index is therefore authenticated: flipping it makes the key fail
  under the binding the index claims (the reader then learns the true state from the other binding and
  reports the session as damaged).
* Each frame is one record, sealed by the session's DEK with associated data binding (cache id, session,
  position, kind, format version): swapping, reordering, moving records between sessions or caches, or
  replaying a valid ciphertext at another position is detected as an integrity error for exactly that
  record; every other record stays readable.
* :meth:`FeatureCache.end_session` appends an encrypted *seal* carrying the frame count and re-wraps the
  session's key as sealed, in one transaction: a sealed session whose tail (or seal) was cut off is detected
  whatever the index's ``frames`` and ``sealed`` columns say.
* :meth:`FeatureCache.forget` is crypto-shredding: the session's wrapped DEK and rows are deleted with
  SQLite's ``secure_delete`` (freed content is zeroed), the WAL is checkpointed and truncated, and by
  default the KEK is rotated so that even an old copy of the database cannot be opened with the key that
  remains. :meth:`FeatureCache.purge` forgets everything and replaces the KEK.
* Retention drops sessions older than ``max_age_s`` and, oldest first, sessions beyond ``max_bytes``.
* Named *blobs* (:meth:`FeatureCache.put_blob`) keep what the device derives from its sessions, such as the
  personalized model, under the same envelope: one fresh data key per write, wrapped under the KEK and bound
  to the blob's name, a record bound to (cache id, name, kind). Replacing or deleting one shreds the old
  version like :meth:`~FeatureCache.forget`; :meth:`~FeatureCache.purge` deletes them all.

Rollback. The database names the fingerprint of the KEK it was committed under, and the key store keeps only
that KEK. Every :meth:`~FeatureCache.end_session`, :meth:`~FeatureCache.forget` (with the default
``rotate_kek_on_forget``), retention drop, :meth:`~FeatureCache.purge` and :meth:`~FeatureCache.rotate_kek`
replaces the KEK and re-wraps every data key, so a copy of the index (database and WAL, whole or any row of
it) taken before the latest of these events no longer opens with the stored key: the cache refuses to open
(:class:`~fedfer.security.errors.IntegrityError`), or, for a single row put back, that session fails
verification. Not detected: a rollback to a copy taken *after* the latest such event, which can only lose
appends to sessions that are still open and sessions begun since (the same as a truncated tail of a
never-sealed session, which looks like a writer that stopped early); a rollback of the key store together with
the database (an attacker holding the old KEK can read what it protected); and, with
``rotate_kek_on_forget=False``, a rollback across a :meth:`~FeatureCache.forget`.

Crash safety: each append (or batch) is one SQLite transaction in WAL mode, so a process killed mid-write
loses at most the transaction in flight and the cache opens afterwards.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import secrets
import sqlite3
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Final, Literal, TypeVar

import numpy as np

from fedfer.agent.files import is_disk_full
from fedfer.agent.records import FEATURE_DIM, FrameRecord
from fedfer.agent.store.keys import KEY_FILE, FileKeyStore, KeyStore, KeyStoreError
from fedfer.security.envelope import DataKey, KeyEncryptionKey, RecordKind
from fedfer.security.errors import FedferError, IntegrityError, ValidationError
from fedfer.security.files import write_atomic

__all__ = [
    "DB_NAME",
    "KEY_FILE_NAME",
    "RESERVE_NAME",
    "BlobNotFoundError",
    "CacheError",
    "CacheFullError",
    "FeatureCache",
    "RecordIntegrityError",
    "SessionContents",
    "SessionInfo",
    "SessionNotFoundError",
    "SessionSealedError",
    "decode_frame",
    "encode_frame",
]

_log = logging.getLogger(__name__)
_T = TypeVar("_T")

DB_NAME: Final = "features.sqlite"
KEY_FILE_NAME: Final = KEY_FILE
_SCHEMA_VERSION: Final = b"2"  # 2: sealed sessions' keys are bound to "sealed"
_LEGACY_SCHEMA: Final = b"1"
_SEALED_BINDING: Final = b"/sealed"
_PAGE_SIZE: Final = 8192  # three ~2.7 KB records per page instead of one per 4 KB page
# A small WAL (checkpointed every 512 KiB) keeps what a full disk leaves un-checkpointed well under the
# space reserve, so that after giving up the reserve a checkpoint can always complete.
_WAL_AUTOCHECKPOINT_PAGES: Final = 64
#: The space reserve: a file of random bytes the cache deletes when the disk is full and it must delete
#: (forget, purge, retention), so that deleting never needs space that is no longer there.
RESERVE_NAME: Final = "space.reserve"
_RESERVE_BYTES: Final = 4 * 1024 * 1024
_DELETE_BATCH: Final = 128  # records per transaction when a forget must free space as it goes
_VACUUM_STEP_PAGES: Final = 128  # free pages returned to the file system per step
_SESSION_ID = re.compile(r"[0-9a-f]{32}")

# Frame plaintext: timestamp f64, score f32, box 4 x f32, K u16, feature 1280 x f16, probs K x f32.
_FRAME_HEADER = struct.Struct("<df4fH")
_FEATURE_BYTES: Final = FEATURE_DIM * 2
_SEAL = struct.Struct("<Q")

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS meta (
    name  TEXT PRIMARY KEY,
    value BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS sessions (
    sid         INTEGER PRIMARY KEY,
    public_id   TEXT NOT NULL UNIQUE,
    created     REAL NOT NULL,
    wrapped_dek BLOB NOT NULL,
    frames      INTEGER NOT NULL DEFAULT 0,
    bytes       INTEGER NOT NULL DEFAULT 0,
    sealed      INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS records (
    sid  INTEGER NOT NULL REFERENCES sessions(sid) ON DELETE CASCADE,
    seq  INTEGER NOT NULL,
    kind INTEGER NOT NULL,
    blob BLOB NOT NULL,
    PRIMARY KEY (sid, seq)
);
CREATE TABLE IF NOT EXISTS blobs (
    name        TEXT PRIMARY KEY,
    updated     REAL NOT NULL,
    wrapped_dek BLOB NOT NULL,
    blob        BLOB NOT NULL
);
"""
_BLOB_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")
_BLOB_BINDING: Final = b"blob:"  # ':' is not hex: a blob's binding never equals a session's
_MAX_BLOB_BYTES: Final = 256 * 1024 * 1024


class CacheError(FedferError):
    """The feature cache cannot carry out an operation (other than an integrity failure)."""


class SessionNotFoundError(CacheError, LookupError):
    """No session with that id exists (never created, forgotten, or dropped by retention)."""


class SessionSealedError(CacheError):
    """The session was ended with :meth:`FeatureCache.end_session`; it accepts no more records."""


class CacheFullError(CacheError, OSError):
    """The device's disk is full: what was being written is not stored; everything stored before is intact."""

    def __init__(self, what: str = "write to the feature cache") -> None:
        super().__init__(errno.ENOSPC, f"no space left on the device to {what}")


class BlobNotFoundError(CacheError, LookupError):
    """No blob of that name is stored."""


class RecordIntegrityError(IntegrityError):
    """One record of a session failed verification (tampered, truncated, swapped, moved or missing).

    Attributes:
        session_id: the session's public id (not secret).
        position: the record's position in the session.
    """

    def __init__(self, session_id: str, position: int) -> None:
        super().__init__(f"record {position} of session {session_id} failed verification")
        self.session_id = session_id
        self.position = position


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """Metadata of one session: never any content.

    Attributes:
        session_id: 32 lowercase hex characters.
        created: creation time, seconds since the epoch.
        frames: number of frame records written.
        bytes: stored bytes (record ciphertexts plus the wrapped data key).
        sealed: whether :meth:`FeatureCache.end_session` closed it.
    """

    session_id: str
    created: float
    frames: int
    bytes: int
    sealed: bool


@dataclass(frozen=True, slots=True)
class SessionContents:
    """The verified part of a session, as returned by :meth:`FeatureCache.recover_session`.

    Attributes:
        session_id: the session's id.
        records: ``(position, record)`` pairs that verified, in order.
        failed: positions that failed verification or are missing.
        complete: True when the session is sealed, its seal verified and no record failed.
    """

    session_id: str
    records: tuple[tuple[int, FrameRecord], ...]
    failed: tuple[int, ...]
    complete: bool

    def __repr__(self) -> str:
        return (
            f"SessionContents(session_id={self.session_id!r}, records={len(self.records)}, "
            f"failed={self.failed!r}, complete={self.complete})"
        )


def encode_frame(record: FrameRecord) -> bytes:
    """Serialize a :class:`FrameRecord` to the cache's compact plaintext (2,590 + 4·K bytes)."""
    if not isinstance(record, FrameRecord):
        raise ValidationError("append takes FrameRecord instances")
    probs = record.ifer_probs  # 1..MAX_CLASSES, checked by FrameRecord
    x, y, w, h = (float(v) for v in record.box)
    header = _FRAME_HEADER.pack(float(record.timestamp), float(record.score), x, y, w, h, probs.size)
    feature = record.feature.astype("<f2", copy=False).tobytes()
    return b"".join((header, feature, probs.astype("<f4", copy=False).tobytes()))


def decode_frame(data: bytes) -> FrameRecord:
    """Parse bytes written by :func:`encode_frame`.

    Raises:
        ValidationError: the bytes do not have the expected layout.
    """
    if len(data) < _FRAME_HEADER.size + _FEATURE_BYTES:
        raise ValidationError("frame record too short")
    timestamp, score, x, y, w, h, k = _FRAME_HEADER.unpack_from(data)
    if len(data) != _FRAME_HEADER.size + _FEATURE_BYTES + 4 * k:
        raise ValidationError("frame record has the wrong length")
    offset = _FRAME_HEADER.size
    feature = np.frombuffer(data, dtype="<f2", count=FEATURE_DIM, offset=offset).astype(np.float16)
    probs = np.frombuffer(data, dtype="<f4", count=k, offset=offset + _FEATURE_BYTES).astype(np.float32)
    return FrameRecord(timestamp=timestamp, feature=feature, ifer_probs=probs, box=(x, y, w, h), score=score)


def _check_session_id(session_id: str) -> bytes:
    if type(session_id) is not str or _SESSION_ID.fullmatch(session_id) is None:
        raise ValidationError("a session id is 32 lowercase hex characters")
    return session_id.encode("ascii")


def _is_full(exc: BaseException) -> bool:
    """Whether ``exc`` is SQLite's or the OS's "disk full"."""
    if isinstance(exc, sqlite3.OperationalError):
        return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
    return is_disk_full(exc)


def _rollback(conn: sqlite3.Connection) -> None:
    # After SQLITE_FULL SQLite may already have rolled the transaction back.
    with contextlib.suppress(sqlite3.Error):
        if conn.in_transaction:
            conn.execute("ROLLBACK")


def _blob_binding(name: str) -> bytes:
    if type(name) is not str or _BLOB_NAME.fullmatch(name) is None:
        raise ValidationError("a blob name is 1..64 characters of a-z, 0-9 and '-'")
    return _BLOB_BINDING + name.encode("ascii")


def _altered_entry(session_id: str) -> IntegrityError:
    return IntegrityError(f"the index entry of session {session_id} does not match its data key")


def _key_binding(session_id: str, sealed: bool) -> bytes:
    """What a session's wrapped data key is bound to: its id, plus ``/sealed`` once the session is ended."""
    name = session_id.encode("ascii")  # hex only, so the suffix cannot make another session's id
    return name + _SEALED_BINDING if sealed else name


def _unwrap(
    kek: KeyEncryptionKey, wrapped: bytes, *, cache_id: bytes, session_id: str, sealed: bool
) -> tuple[DataKey, bool]:
    """Unwrap a session's data key; returns it and the session's authenticated seal state.

    The binding the index claims (``sealed``) is tried first; if it fails, the other one is tried, so that a
    flipped ``sealed`` column is reported as a damaged session rather than an unreadable one.

    Raises:
        IntegrityError: the wrapped key opens under neither binding.
    """
    for state in (sealed, not sealed):
        try:
            binding = _key_binding(session_id, state)
            return kek.unwrap_data_key(wrapped, cache_id=cache_id, session_id=binding), state
        except IntegrityError:
            continue
    raise IntegrityError(f"the data key of session {session_id} failed verification")


@dataclass(frozen=True, slots=True, repr=False)
class _SessionKey:
    """An unwrapped data key, valid for as long as the stored wrapped key and the KEK are these."""

    wrapped: bytes
    kek_fingerprint: str
    dek: DataKey
    sealed: bool


class FeatureCache:
    """Encrypted, crash-safe store of per-frame features grouped by session.

    Safe to share between threads of one process; several processes may open the same directory (SQLite
    WAL serializes writers; a KEK rotated by one process is picked up by the others).

    Example::

        with FeatureCache(state_dir / "cache") as cache:
            sid = cache.begin_session()
            cache.append_batch(sid, records)
            cache.end_session(sid)
            frames = cache.read_session(sid)
    """

    def __init__(
        self,
        directory: Path | str,
        *,
        key_store: KeyStore | None = None,
        max_age_s: float | None = None,
        max_bytes: int | None = None,
        rotate_kek_on_forget: bool = True,
        reserve_bytes: int = _RESERVE_BYTES,
        synchronous: Literal["FULL", "NORMAL"] = "FULL",
        busy_timeout_s: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Open (creating if needed) the cache in ``directory``.

        Args:
            directory: the cache's directory; created with mode 0700 when missing.
            key_store: where the KEK lives; default: a 0600 file ``directory/cache.kek``.
            max_age_s: drop sessions created longer ago than this (None: no age limit).
            max_bytes: keep the stored bytes under this, dropping the oldest sessions first (None: no limit).
            rotate_kek_on_forget: replace the KEK on every :meth:`forget` (and retention drop), so an old
                copy of the database cannot be opened with the key that remains. Sealing always rotates.
            reserve_bytes: size of the space reserve (:data:`RESERVE_NAME`) given up when the disk is full
                and something must be deleted; 0 keeps none.
            synchronous: SQLite's durability level; FULL also survives power loss, NORMAL survives a killed
                process (WAL) and is faster.
            busy_timeout_s: how long to wait for another process's write lock.
            clock: source of "now" in seconds since the epoch (injected by tests).

        Raises:
            ValidationError: a bad argument.
            CacheError: the index file is not a readable SQLite database.
            InsecureKeyFileError: the key file is accessible by group/others.
            KeyStoreError: the database exists but its KEK is missing from the key store.
            IntegrityError: the key store's KEK does not open this database.
        """
        if max_age_s is not None and (type(max_age_s) not in (int, float) or not max_age_s > 0):
            raise ValidationError("max_age_s must be a positive number or None")
        if max_bytes is not None and (type(max_bytes) is not int or max_bytes <= 0):
            raise ValidationError("max_bytes must be a positive int or None")
        if synchronous not in ("FULL", "NORMAL"):
            raise ValidationError("synchronous must be 'FULL' or 'NORMAL'")
        if type(busy_timeout_s) not in (int, float) or busy_timeout_s < 0:
            raise ValidationError("busy_timeout_s must be a non-negative number")
        if type(rotate_kek_on_forget) is not bool:
            raise ValidationError("rotate_kek_on_forget must be a bool")
        if type(reserve_bytes) is not int or reserve_bytes < 0:
            raise ValidationError("reserve_bytes must be a non-negative int")
        self._dir = Path(directory)
        self._dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._store: KeyStore = FileKeyStore(self._dir / KEY_FILE_NAME) if key_store is None else key_store
        self._max_age_s = None if max_age_s is None else float(max_age_s)
        self._max_bytes = max_bytes
        self._rotate_on_forget = rotate_kek_on_forget
        self._reserve_bytes = reserve_bytes
        self._synchronous = synchronous
        self._busy_timeout_s = float(busy_timeout_s)
        self._clock = clock
        self._lock = threading.RLock()
        self._deks: dict[str, _SessionKey] = {}
        self._db_path = self._dir / DB_NAME
        self._conn: sqlite3.Connection | None = None
        self._cache_id, self._kek = self._connect()
        self._ensure_reserve()

    def _connect(self) -> tuple[bytes, KeyEncryptionKey]:
        """Open the index (creating it if needed); returns the cache id and its KEK."""
        self._touch_private(self._db_path)
        conn = sqlite3.connect(
            self._db_path, isolation_level=None, check_same_thread=False, timeout=self._busy_timeout_s
        )
        self._conn = conn
        try:
            self._configure(self._synchronous)
            return self._initialize()
        except sqlite3.DatabaseError as exc:
            conn.close()
            self._conn = None
            if _is_full(exc):
                raise CacheFullError("open the feature cache") from None
            raise CacheError(f"the cache index {self._db_path} is unreadable or corrupt") from exc
        except BaseException:
            conn.close()
            self._conn = None
            raise

    # -- lifecycle ------------------------------------------------------------------------------------

    def __repr__(self) -> str:
        return f"FeatureCache({str(self._dir)!r})"

    def __enter__(self) -> FeatureCache:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the database and drop every key handle this instance holds. Idempotent."""
        with self._lock:
            self._deks.clear()
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    @property
    def directory(self) -> Path:
        """The cache's directory."""
        return self._dir

    @property
    def database_path(self) -> Path:
        """The SQLite index file (``-wal`` and ``-shm`` files sit beside it)."""
        return self._db_path

    # -- sessions -------------------------------------------------------------------------------------

    def begin_session(self, *, created: float | None = None) -> str:
        """Start a session with a fresh data key; returns its id (32 hex characters).

        Retention is enforced first, so a full cache makes room by dropping its oldest sessions.
        """
        if created is not None and type(created) not in (int, float):
            raise ValidationError("created must be a number")
        when = float(self._clock() if created is None else created)
        self.enforce_retention()
        session_id = secrets.token_hex(16)
        dek = DataKey.generate()
        with self._lock, self._write() as conn:
            kek = self._current_kek(conn)
            wrapped = kek.wrap_data_key(
                dek, cache_id=self._cache_id, session_id=_key_binding(session_id, False)
            )
            conn.execute(
                "INSERT INTO sessions (public_id, created, wrapped_dek, bytes) VALUES (?, ?, ?, ?)",
                (session_id, when, wrapped, len(wrapped)),
            )
            self._deks[session_id] = _SessionKey(wrapped, kek.fingerprint, dek, False)
        _log.debug("cache session %s started", session_id)
        return session_id

    def append(self, session_id: str, record: FrameRecord) -> int:
        """Encrypt and store one frame; returns its position. One transaction (see :meth:`append_batch`)."""
        return self.append_batch(session_id, (record,))[0]

    def append_batch(self, session_id: str, records: Iterable[FrameRecord]) -> list[int]:
        """Encrypt and store frames in one transaction; returns their positions.

        Either all of the batch is stored or none of it (a killed process loses the batch in flight).

        Raises:
            SessionNotFoundError: unknown session.
            SessionSealedError: the session was ended.
            ValidationError: an element is not a FrameRecord.
        """
        sid_bytes = _check_session_id(session_id)
        plaintexts = [encode_frame(r) for r in records]
        with self._lock, self._write() as conn:
            sid, frames, sealed, wrapped = self._session_row(conn, session_id)
            if sealed:
                raise SessionSealedError(f"session {session_id} is sealed")
            dek, truly_sealed = self._dek(conn, session_id, wrapped, sealed)
            if truly_sealed:
                raise _altered_entry(session_id)
            rows = []
            total = 0
            for i, plaintext in enumerate(plaintexts):
                blob = dek.encrypt_record(
                    plaintext,
                    cache_id=self._cache_id,
                    session_id=sid_bytes,
                    position=frames + i,
                    kind=RecordKind.FRAME,
                )
                rows.append((sid, frames + i, RecordKind.FRAME, blob))
                total += len(blob)
            conn.executemany("INSERT INTO records (sid, seq, kind, blob) VALUES (?, ?, ?, ?)", rows)
            conn.execute(
                "UPDATE sessions SET frames = frames + ?, bytes = bytes + ? WHERE sid = ?",
                (len(rows), total, sid),
            )
        if self._max_bytes is not None and self.total_bytes() > self._max_bytes:
            self.enforce_retention(keep=session_id)
        return list(range(frames, frames + len(plaintexts)))

    def end_session(self, session_id: str) -> None:
        """Seal the session: append an encrypted record of its frame count; later appends are refused.

        In the same transaction the session's data key is re-wrapped as sealed and the KEK is rotated (every
        data key re-wrapped under a new one), so a copy of the index from before the seal no longer opens.
        Idempotent for a session that is already sealed.

        Raises:
            SessionNotFoundError: unknown session.
            IntegrityError: the session's data key or index entry failed verification.
        """
        sid_bytes = _check_session_id(session_id)
        with self._lock:
            with self._write() as conn:
                sid, frames, sealed, wrapped = self._session_row(conn, session_id)
                if sealed:
                    return
                dek, truly_sealed = self._dek(conn, session_id, wrapped, sealed)
                if truly_sealed:
                    raise _altered_entry(session_id)
                blob = dek.encrypt_record(
                    _SEAL.pack(frames),
                    cache_id=self._cache_id,
                    session_id=sid_bytes,
                    position=frames,
                    kind=RecordKind.SEAL,
                )
                conn.execute(
                    "INSERT INTO records (sid, seq, kind, blob) VALUES (?, ?, ?, ?)",
                    (sid, frames, RecordKind.SEAL, blob),
                )
                conn.execute(
                    "UPDATE sessions SET sealed = 1, bytes = bytes + ? WHERE sid = ?", (len(blob), sid)
                )
                new = self._rewrap_all(conn, sealing=sid)
            self._rotated(new)

    def sessions(self) -> list[SessionInfo]:
        """Metadata of every session, oldest first (no content, no keys)."""
        with self._lock:
            rows = (
                self._db()
                .execute(
                    "SELECT public_id, created, frames, bytes, sealed FROM sessions ORDER BY created, sid"
                )
                .fetchall()
            )
        return [SessionInfo(str(r[0]), float(r[1]), int(r[2]), int(r[3]), bool(r[4])) for r in rows]

    def session_info(self, session_id: str) -> SessionInfo:
        """Metadata of one session.

        Raises:
            SessionNotFoundError: unknown session.
        """
        _check_session_id(session_id)
        with self._lock:
            row = (
                self._db()
                .execute(
                    "SELECT public_id, created, frames, bytes, sealed FROM sessions WHERE public_id = ?",
                    (session_id,),
                )
                .fetchone()
            )
        if row is None:
            raise SessionNotFoundError(f"no session {session_id}")
        return SessionInfo(str(row[0]), float(row[1]), int(row[2]), int(row[3]), bool(row[4]))

    def total_bytes(self) -> int:
        """Stored bytes over all sessions (record ciphertexts plus wrapped data keys)."""
        with self._lock:
            (total,) = self._db().execute("SELECT COALESCE(SUM(bytes), 0) FROM sessions").fetchone()
        return int(total)

    # -- reading --------------------------------------------------------------------------------------

    def read_record(self, session_id: str, position: int) -> FrameRecord:
        """Verify and decode one frame.

        Raises:
            SessionNotFoundError: unknown session.
            RecordIntegrityError: the record is missing or failed verification.
            ValidationError: ``position`` is out of the session's range.
        """
        sid_bytes = _check_session_id(session_id)
        if type(position) is not int or position < 0:
            raise ValidationError("position must be a non-negative int")
        with self._lock, self._read() as conn:
            sid, frames, sealed, wrapped = self._session_row(conn, session_id)
            if position >= frames:
                raise ValidationError(f"session {session_id} has {frames} frames")
            row = conn.execute(
                "SELECT kind, blob FROM records WHERE sid = ? AND seq = ?", (sid, position)
            ).fetchone()
            dek, _ = self._dek(conn, session_id, wrapped, sealed)
        if row is None:
            raise RecordIntegrityError(session_id, position)
        return self._open_frame(dek, sid_bytes, session_id, position, int(row[0]), row[1])

    def read_session(self, session_id: str) -> list[FrameRecord]:
        """All frames of a session, verified; strict.

        Raises:
            SessionNotFoundError: unknown session.
            RecordIntegrityError: the first record that is missing or failed verification (including a
                sealed session whose seal does not match its frames). Use :meth:`recover_session` to read
                whatever still verifies.
        """
        contents = self.recover_session(session_id)
        if contents.failed:
            raise RecordIntegrityError(session_id, contents.failed[0])
        return [record for _, record in contents.records]

    def iter_sessions(self) -> Iterator[tuple[SessionInfo, list[FrameRecord]]]:
        """Yield ``(info, frames)`` for every session, oldest first (strict, as :meth:`read_session`)."""
        for info in self.sessions():
            try:
                yield info, self.read_session(info.session_id)
            except SessionNotFoundError:
                continue  # forgotten meanwhile (another process, retention)

    def recover_session(self, session_id: str) -> SessionContents:
        """Read every record of a session that verifies; report the positions that do not.

        Records that fail (and a data key that fails) are logged as a warning: the session's id and how many,
        never their contents.

        Raises:
            SessionNotFoundError: unknown session.
            IntegrityError: the session's data key failed verification (nothing of the session can be read).
        """
        sid_bytes = _check_session_id(session_id)
        with self._lock, self._read() as conn:
            sid, frames, sealed, wrapped = self._session_row(conn, session_id)
            rows = conn.execute(
                "SELECT seq, kind, blob FROM records WHERE sid = ? ORDER BY seq", (sid,)
            ).fetchall()
            try:
                dek, truly_sealed = self._dek(conn, session_id, wrapped, sealed)
            except IntegrityError:
                _log.warning(
                    "cache session %s…: its data key failed verification; nothing of it is read",
                    session_id[:8],
                )
                raise
        good: list[tuple[int, FrameRecord]] = []
        failed: set[int] = set()
        seal_count: int | None = None
        seen: set[int] = set()
        for seq, kind, blob in rows:
            seq = int(seq)
            seen.add(seq)
            if kind == RecordKind.SEAL:
                try:
                    plain = dek.decrypt_record(
                        blob,
                        cache_id=self._cache_id,
                        session_id=sid_bytes,
                        position=seq,
                        kind=RecordKind.SEAL,
                    )
                    (seal_count,) = _SEAL.unpack(plain)
                    if seal_count != seq:
                        raise IntegrityError("seal position mismatch")
                except (IntegrityError, ValidationError, struct.error):
                    failed.add(seq)
                    seal_count = None
                continue
            try:
                good.append((seq, self._open_frame(dek, sid_bytes, session_id, seq, int(kind), blob)))
            except RecordIntegrityError:
                failed.add(seq)
        # Positions the index promises but that are gone, and anything past an authenticated seal count.
        expected = seal_count if seal_count is not None else frames
        failed.update(p for p in range(expected) if p not in seen)
        if seal_count is not None:
            failed.update(p for p, _ in good if p >= seal_count)
            good = [(p, r) for p, r in good if p < seal_count]
        if sealed != truly_sealed or (truly_sealed and seal_count is None):
            # The index's seal flag was altered, or the data key says sealed but the seal is gone (a cut
            # tail): report the seal's position, after every frame the index or the rows know of.
            failed.add(seal_count if seal_count is not None else max([frames, *(p + 1 for p in seen)]))
        complete = truly_sealed and seal_count is not None and not failed
        if failed:
            _log.warning(
                "cache session %s…: %d record(s) failed verification or are missing and were left out "
                "(%d verified)",
                session_id[:8],
                len(failed),
                len(good),
            )
        return SessionContents(session_id, tuple(good), tuple(sorted(failed)), complete)

    # -- forgetting -----------------------------------------------------------------------------------

    def forget(self, session_id: str) -> None:
        """Crypto-shred a session: delete its wrapped data key and records, leaving nothing decryptable.

        Deleted content is zeroed (``secure_delete``), the WAL is checkpointed and truncated, free pages are
        returned to the file system, and (by default) the KEK is rotated. On a full disk the space reserve
        is given up and, if even that is not enough for one transaction, the records go in small batches
        (the data key last).

        Raises:
            SessionNotFoundError: unknown session.
            CacheFullError: not even the reserve made room (the session may have lost records, but its data
                key and the rest are intact; forget it again once there is space).
        """
        _check_session_id(session_id)
        with self._lock:
            try:
                deleted = self._freeing(lambda: self._delete_sessions([session_id]))
            except CacheFullError:
                deleted = self._delete_in_batches(session_id)
            if deleted == 0:
                raise SessionNotFoundError(f"no session {session_id}")
            self._after_deleting()
        _log.info("cache session %s forgotten", session_id)

    def purge(self) -> None:
        """Forget every session and blob and replace the KEK (the old one is overwritten and discarded)."""
        with self._lock:
            self._deks.clear()
            try:
                self._freeing(self._delete_all)
                self._freeing(self._rotate)
            except CacheFullError:
                self._purge_files()
            self._scrub()
        _log.info("cache purged; key-encryption key replaced")

    def _delete_all(self) -> None:
        with self._write() as conn:
            conn.execute("DELETE FROM records")
            conn.execute("DELETE FROM sessions")
            conn.execute("DELETE FROM blobs")

    def _purge_files(self) -> None:
        """Purge when the disk is too full even to delete rows: destroy the KEK, delete the index files,
        and start an empty cache (what a purge leaves anyway)."""
        _log.warning("disk full: purging the cache by destroying its key and deleting its files")
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
        self._store.destroy()
        for suffix in ("", "-wal", "-shm"):
            Path(f"{self._db_path}{suffix}").unlink(missing_ok=True)
        self._cache_id, self._kek = self._connect()

    def rotate_kek(self) -> None:
        """Replace the KEK and re-wrap every session's data key under the new one, crash-safely.

        The store briefly holds both keys; whichever the database was committed under is used on the next
        open, and the old key is then discarded.
        """
        with self._lock:
            self._rotate()
            self._scrub()

    def _rotate(self) -> None:
        with self._lock:
            with self._write() as conn:
                new = self._rewrap_all(conn)
            self._rotated(new)

    def _rewrap_all(self, conn: sqlite3.Connection, *, sealing: int | None = None) -> KeyEncryptionKey:
        """Inside a write transaction: re-wrap every data key under a fresh KEK and name it in ``meta``.

        Each key keeps its authenticated seal state (whatever the index says), except the session
        ``sealing`` (its row id), which is being sealed in this transaction. The store holds both KEKs
        until :meth:`_rotated` runs after the commit, so a crash in between leaves the committed one.
        """
        new = KeyEncryptionKey.generate()
        old = self._current_kek(conn)
        self._store.save([old, new])
        rows = conn.execute("SELECT sid, public_id, wrapped_dek, sealed FROM sessions").fetchall()
        for sid, public_id, wrapped, sealed in rows:
            name = str(public_id)
            try:
                dek, truly_sealed = _unwrap(
                    old, bytes(wrapped), cache_id=self._cache_id, session_id=name, sealed=bool(sealed)
                )
            except IntegrityError:
                # Already unreadable (its wrapped key was tampered with): it cannot be re-wrapped, and
                # must not block forgetting the others. It stays listed so it can be forgotten.
                _log.warning("cache session %s has a corrupt data key; left as is", public_id)
                continue
            binding = _key_binding(name, True if sid == sealing else truly_sealed)
            conn.execute(
                "UPDATE sessions SET wrapped_dek = ? WHERE sid = ?",
                (new.wrap_data_key(dek, cache_id=self._cache_id, session_id=binding), sid),
            )
        for name, wrapped in conn.execute("SELECT name, wrapped_dek FROM blobs").fetchall():
            binding = _blob_binding(str(name))
            try:
                dek = old.unwrap_data_key(bytes(wrapped), cache_id=self._cache_id, session_id=binding)
            except IntegrityError:
                _log.warning("cache blob %s has a corrupt data key; left as is", name)
                continue
            conn.execute(
                "UPDATE blobs SET wrapped_dek = ? WHERE name = ?",
                (new.wrap_data_key(dek, cache_id=self._cache_id, session_id=binding), name),
            )
        conn.execute("UPDATE meta SET value = ? WHERE name = 'kek'", (new.fingerprint.encode(),))
        return new

    def _rotated(self, new: KeyEncryptionKey) -> None:
        """After the commit of :meth:`_rewrap_all`: keep only the new KEK."""
        self._store.save([new])
        self._kek = new

    # -- blobs ----------------------------------------------------------------------------------------

    def put_blob(self, name: str, data: bytes) -> None:
        """Encrypt and store ``data`` as blob ``name``, replacing (and shredding) any earlier version.

        The blob gets a fresh data key; when it replaces one, the KEK is rotated as on :meth:`forget`.

        Raises:
            ValidationError: a bad name, or ``data`` is not bytes or is over 256 MiB.
        """
        binding = _blob_binding(name)
        if type(data) is not bytes or len(data) > _MAX_BLOB_BYTES:
            raise ValidationError("blob data must be bytes, at most 256 MiB")
        dek = DataKey.generate()
        with self._lock:
            with self._write() as conn:
                kek = self._current_kek(conn)
                wrapped = kek.wrap_data_key(dek, cache_id=self._cache_id, session_id=binding)
                blob = dek.encrypt_record(
                    data, cache_id=self._cache_id, session_id=binding, position=0, kind=RecordKind.BLOB
                )
                replaced = conn.execute("DELETE FROM blobs WHERE name = ?", (name,)).rowcount > 0
                conn.execute(
                    "INSERT INTO blobs (name, updated, wrapped_dek, blob) VALUES (?, ?, ?, ?)",
                    (name, float(self._clock()), wrapped, blob),
                )
            if replaced:
                self._after_deleting()
        _log.debug("cache blob %s stored", name)

    def get_blob(self, name: str) -> bytes:
        """Verify and decrypt blob ``name``.

        Raises:
            BlobNotFoundError: no such blob.
            IntegrityError: its data key or ciphertext failed verification (tampered, moved or truncated).
        """
        binding = _blob_binding(name)
        with self._lock, self._read() as conn:
            row = conn.execute("SELECT wrapped_dek, blob FROM blobs WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise BlobNotFoundError(f"no blob {name}")
            kek = self._current_kek(conn)
        try:
            dek = kek.unwrap_data_key(bytes(row[0]), cache_id=self._cache_id, session_id=binding)
            return dek.decrypt_record(
                bytes(row[1]), cache_id=self._cache_id, session_id=binding, position=0, kind=RecordKind.BLOB
            )
        except IntegrityError:
            raise IntegrityError(f"cache blob {name} failed verification") from None

    def blob_names(self) -> list[str]:
        """The names of the stored blobs, sorted (no content)."""
        with self._lock:
            rows = self._db().execute("SELECT name FROM blobs ORDER BY name").fetchall()
        return [str(r[0]) for r in rows]

    def delete_blob(self, name: str) -> bool:
        """Shred blob ``name`` (row zeroed, WAL truncated, KEK rotated); False if there was none."""
        _blob_binding(name)
        with self._lock:
            deleted = self._freeing(lambda: self._delete_blob_row(name))
            if deleted:
                self._after_deleting()
        if deleted:
            _log.info("cache blob %s deleted", name)
        return deleted

    def _delete_blob_row(self, name: str) -> bool:
        with self._write() as conn:
            return bool(conn.execute("DELETE FROM blobs WHERE name = ?", (name,)).rowcount > 0)

    def enforce_retention(self, *, now: float | None = None, keep: str | None = None) -> list[str]:
        """Drop sessions older than ``max_age_s``, then the oldest until under ``max_bytes``.

        Args:
            now: the current time (default: the injected clock).
            keep: a session never dropped for size (the one being written).

        Returns:
            The ids of the dropped sessions, oldest first.
        """
        if self._max_age_s is None and self._max_bytes is None:
            return []
        when = float(self._clock() if now is None else now)
        with self._lock:
            infos = self.sessions()
            drop: list[str] = []
            if self._max_age_s is not None:
                drop = [s.session_id for s in infos if s.created < when - self._max_age_s]
            if self._max_bytes is not None:
                remaining = [s for s in infos if s.session_id not in drop]
                total = sum(s.bytes for s in remaining)
                for s in remaining:
                    if total <= self._max_bytes:
                        break
                    if s.session_id == keep:
                        continue
                    drop.append(s.session_id)
                    total -= s.bytes
            if drop:
                self._freeing(lambda: self._delete_sessions(drop))
                self._after_deleting()
                _log.info("retention dropped %d cache session(s)", len(drop))
        return drop

    # -- internals ------------------------------------------------------------------------------------

    @staticmethod
    def _touch_private(path: Path) -> None:
        # SQLite creates the -wal and -shm files with the database file's permissions: make those 0600.
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            return
        os.close(fd)

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise CacheError("the feature cache is closed")
        return self._conn

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; a full disk rolls it back and raises :class:`CacheFullError`."""
        conn = self._db()
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                _rollback(conn)
                raise
        except (sqlite3.OperationalError, OSError) as exc:
            if isinstance(exc, CacheFullError) or not _is_full(exc):
                raise
            raise CacheFullError() from None

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        # One snapshot for the session row, the KEK fingerprint and the records, so that a rotation
        # committed by another process in between cannot pair a wrapped key with the wrong KEK.
        conn = self._db()
        conn.execute("BEGIN")
        try:
            yield conn
        finally:
            conn.execute("COMMIT")

    def _configure(self, synchronous: str) -> None:
        conn = self._db()
        (pages,) = conn.execute("PRAGMA page_count").fetchone()
        if pages == 0:  # a brand-new file: layout pragmas only take effect before the first table
            conn.execute(f"PRAGMA page_size = {_PAGE_SIZE}")
            conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(f"PRAGMA synchronous = {synchronous}")
        conn.execute("PRAGMA secure_delete = ON")
        conn.execute(f"PRAGMA wal_autocheckpoint = {_WAL_AUTOCHECKPOINT_PAGES}")
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA temp_store = MEMORY")

    def _initialize(self) -> tuple[bytes, KeyEncryptionKey]:
        with self._write() as conn:
            # executescript() would commit on its own: run the statements inside this transaction instead.
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            meta = dict(conn.execute("SELECT name, value FROM meta").fetchall())
            keys = self._store.load()
            if not meta:
                kek = keys[-1] if keys else KeyEncryptionKey.generate()
                if not keys:
                    self._store.save([kek])
                cache_id = secrets.token_bytes(16)
                conn.executemany(
                    "INSERT INTO meta (name, value) VALUES (?, ?)",
                    [("schema", _SCHEMA_VERSION), ("cache_id", cache_id), ("kek", kek.fingerprint.encode())],
                )
                return cache_id, kek
            if meta.get("schema") not in (_SCHEMA_VERSION, _LEGACY_SCHEMA):
                raise CacheError("unsupported cache format version")
            if not keys:  # name the store: with key_store "auto" the key may be in the other one
                raise KeyStoreError(
                    f"the cache's key-encryption key is missing from {self._store!r}; "
                    "without it its contents are unrecoverable"
                )
            kek = self._matching_kek(keys, bytes(meta["kek"]).decode("ascii"))
            cache_id = bytes(meta["cache_id"])
            if meta["schema"] == _LEGACY_SCHEMA:
                self._migrate_legacy(conn, kek, cache_id)
            if len(keys) > 1:  # a rotation was interrupted: keep only the key the database uses
                self._store.save([kek])
            return cache_id, kek

    @staticmethod
    def _migrate_legacy(conn: sqlite3.Connection, kek: KeyEncryptionKey, cache_id: bytes) -> None:
        """Format 1 → 2: re-wrap the data keys of sealed sessions as sealed (format 1 bound only the id).

        Format 1 trusted the index's ``sealed`` column; the migration trusts it once, as that format did,
        and from then on it is authenticated.
        """
        rows = conn.execute("SELECT sid, public_id, wrapped_dek FROM sessions WHERE sealed = 1").fetchall()
        for sid, public_id, wrapped in rows:
            name = str(public_id)
            try:
                dek = kek.unwrap_data_key(
                    bytes(wrapped), cache_id=cache_id, session_id=_key_binding(name, False)
                )
            except IntegrityError:
                _log.warning("cache session %s has a corrupt data key; left as is", public_id)
                continue
            rewrapped = kek.wrap_data_key(dek, cache_id=cache_id, session_id=_key_binding(name, True))
            conn.execute("UPDATE sessions SET wrapped_dek = ? WHERE sid = ?", (rewrapped, sid))
        conn.execute("UPDATE meta SET value = ? WHERE name = 'schema'", (_SCHEMA_VERSION,))
        _log.info("cache index migrated to format %s", _SCHEMA_VERSION.decode())

    @staticmethod
    def _matching_kek(keys: Sequence[KeyEncryptionKey], fingerprint: str) -> KeyEncryptionKey:
        for key in keys:
            if secrets.compare_digest(key.fingerprint, fingerprint):
                return key
        if not keys:
            raise KeyStoreError("the cache's key-encryption key is missing; its contents are unrecoverable")
        raise IntegrityError("the key-encryption key does not open this cache")

    def _current_kek(self, conn: sqlite3.Connection) -> KeyEncryptionKey:
        (value,) = conn.execute("SELECT value FROM meta WHERE name = 'kek'").fetchone()
        fingerprint = bytes(value).decode("ascii")
        if fingerprint != self._kek.fingerprint:  # another process rotated it
            self._kek = self._matching_kek(self._store.load(), fingerprint)
        return self._kek

    def _session_row(self, conn: sqlite3.Connection, session_id: str) -> tuple[int, int, bool, bytes]:
        row = conn.execute(
            "SELECT sid, frames, sealed, wrapped_dek FROM sessions WHERE public_id = ?", (session_id,)
        ).fetchone()
        if row is None:
            self._deks.pop(session_id, None)
            raise SessionNotFoundError(f"no session {session_id}")
        return int(row[0]), int(row[1]), bool(row[2]), bytes(row[3])

    def _dek(
        self, conn: sqlite3.Connection, session_id: str, wrapped: bytes, sealed: bool
    ) -> tuple[DataKey, bool]:
        """The session's data key and its authenticated seal state, verified against the stored wrapped key.

        A key unwrapped before is reused only while the stored wrapped key and the KEK are unchanged, so an
        index edited by another process (or an attacker) is verified again.
        """
        kek = self._current_kek(conn)
        entry = self._deks.get(session_id)
        if entry is not None and entry.wrapped == wrapped and entry.kek_fingerprint == kek.fingerprint:
            return entry.dek, entry.sealed
        dek, truly_sealed = _unwrap(
            kek, wrapped, cache_id=self._cache_id, session_id=session_id, sealed=sealed
        )
        self._deks[session_id] = _SessionKey(wrapped, kek.fingerprint, dek, truly_sealed)
        return dek, truly_sealed

    def _open_frame(
        self, dek: DataKey, sid_bytes: bytes, session_id: str, position: int, kind: int, blob: bytes
    ) -> FrameRecord:
        try:
            if kind != RecordKind.FRAME:
                raise IntegrityError("not a frame record")
            plain = dek.decrypt_record(
                blob, cache_id=self._cache_id, session_id=sid_bytes, position=position, kind=RecordKind.FRAME
            )
            return decode_frame(plain)
        except (IntegrityError, ValidationError):
            raise RecordIntegrityError(session_id, position) from None

    def _delete_sessions(self, session_ids: Sequence[str]) -> int:
        deleted = 0
        with self._write() as conn:
            for session_id in session_ids:
                row = conn.execute("SELECT sid FROM sessions WHERE public_id = ?", (session_id,)).fetchone()
                if row is None:
                    continue
                conn.execute("DELETE FROM records WHERE sid = ?", (row[0],))
                conn.execute("DELETE FROM sessions WHERE sid = ?", (row[0],))
                deleted += 1
        for session_id in session_ids:
            self._deks.pop(session_id, None)
        return deleted

    def _scrub(self) -> None:
        """Return free pages to the file system and fold the WAL into the database, then truncate it.

        Then the space reserve is made whole again if the deletion gave up some of it (best effort).
        """
        conn = self._db()
        try:
            # A step at a time, each folded into the file (which truncates it), so that on a full disk the
            # vacuum's own WAL pages always fit in what the previous step returned.
            self._truncate_wal(conn, attempts=1)
            left = int(conn.execute("PRAGMA freelist_count").fetchone()[0])
            while left:
                # Through executescript(): sqlite3's execute() steps this pragma once, one page only.
                conn.executescript(f"PRAGMA incremental_vacuum({_VACUUM_STEP_PAGES});")
                self._truncate_wal(conn, attempts=1)
                now = int(conn.execute("PRAGMA freelist_count").fetchone()[0])
                if now >= left:
                    break
                left = now
            if not self._truncate_wal(conn, attempts=50):
                _log.warning("cache WAL could not be truncated: another process holds a read transaction")
        except sqlite3.OperationalError as exc:
            if not _is_full(exc):
                raise
            # Freed pages stay zeroed in the file (secure_delete); they are reused or returned later.
            _log.warning("disk full: the cache's free pages are kept for now")
        self._ensure_reserve()

    @staticmethod
    def _truncate_wal(conn: sqlite3.Connection, *, attempts: int) -> bool:
        """Checkpoint the WAL into the database and truncate it; False if readers kept it busy."""
        for attempt in range(attempts):
            busy, _log_frames, _done = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            if not busy:
                return True
            time.sleep(0.02 * (attempt + 1) if attempt < 10 else 0.2)
        return False

    def _after_deleting(self) -> None:
        """After rows were deleted: rotate the KEK (unless configured off) and scrub the files."""
        if self._rotate_on_forget:
            self._freeing(self._rotate)
        self._scrub()

    def _freeing(self, op: Callable[[], _T]) -> _T:
        """Run a deletion; on a full disk give up the space reserve, fold the WAL in, and run it once more.

        Folding the WAL in (a checkpoint that truncates it) also returns the space that the frames of the
        failed attempt took.
        """
        try:
            return op()
        except CacheFullError:
            if self._release_reserve():
                _log.warning("disk full: the cache gave up its space reserve to delete")
            self._fold_wal()
            return op()

    def _delete_in_batches(self, session_id: str) -> int:
        """Forget on a disk too full for one transaction: records a few at a time, then the data key."""
        conn = self._db()
        row = conn.execute("SELECT sid FROM sessions WHERE public_id = ?", (session_id,)).fetchone()
        if row is None:
            return 0
        self._fold_wal()
        while True:
            with self._write() as conn:
                gone = conn.execute(
                    "DELETE FROM records WHERE rowid IN (SELECT rowid FROM records WHERE sid = ? LIMIT ?)",
                    (row[0], _DELETE_BATCH),
                ).rowcount
            # The batch's pages are in the WAL: folding them into the file keeps the WAL from growing.
            self._fold_wal()
            if gone == 0:
                break
        return self._delete_sessions([session_id])

    def _fold_wal(self) -> None:
        """Checkpoint and truncate the WAL if the disk allows (best effort)."""
        try:
            self._truncate_wal(self._db(), attempts=5)
        except sqlite3.OperationalError as exc:
            if not _is_full(exc):
                raise

    @property
    def _reserve_path(self) -> Path:
        return self._dir / RESERVE_NAME

    def _ensure_reserve(self) -> None:
        """Create the space reserve if it is missing (random bytes, like the ciphertext beside it)."""
        path = self._reserve_path
        if self._reserve_bytes == 0:
            path.unlink(missing_ok=True)
            return
        with contextlib.suppress(FileNotFoundError):
            if path.stat().st_size == self._reserve_bytes:
                return
        try:
            write_atomic(path, os.urandom(self._reserve_bytes))
        except OSError as exc:
            if not is_disk_full(exc):
                raise
            _log.warning("disk full: the cache has no space reserve for now")

    def _release_reserve(self) -> bool:
        try:
            self._reserve_path.unlink()
        except FileNotFoundError:
            return False
        return True
