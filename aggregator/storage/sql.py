# ruff: noqa: S608 -- only module constants are interpolated into SQL; values are always bound parameters.
"""The SQL implementation of :class:`~fedfer.aggregator.storage.base.Storage` shared by SQLite and PostgreSQL.

Backends supply a connection, a transaction context manager, the DDL type names and the driver's
integrity-error classes; every query is written once here with ``?`` placeholders. Races between replicas
are settled by constraints (primary keys, a partial unique index allowing one active round per cohort) and by
compare-and-set updates, never by reading and then writing in separate statements.
"""

from __future__ import annotations

import abc
import contextlib
import datetime as dt
import json
import threading
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from typing import Any, Protocol, TypeVar

from fedfer.aggregator.storage.base import (
    ConflictError,
    DeviceRecord,
    JsonValue,
    LeaseRecord,
    ModelInfo,
    ModelRecord,
    NotFoundError,
    ResponseRecord,
    RoundRecord,
    Storage,
    StorageCorruptError,
    StorageError,
    TokenRecord,
)
from fedfer.security.secagg.stage import Stage

__all__ = ["SCHEMA_VERSION", "Cursor", "SqlStorage"]

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_TERMINAL = tuple(stage.key for stage in Stage if stage.terminal)
_MAX_TEXT = 256
_IN_BATCH = 500  # values per IN (...) list, well below every SQLite build's bound-parameter limit
T = TypeVar("T")


class Cursor(Protocol):
    """The part of a DB-API cursor the shared queries use."""

    @property
    def rowcount(self) -> int:
        """Rows changed by the last statement."""

    def execute(self, sql: str, params: Sequence[Any] = ..., /) -> Any:
        """Run one statement."""

    def fetchone(self) -> Any:
        """Return the next row or None."""

    def fetchall(self) -> Any:
        """Return the remaining rows."""


# Each migration is a list of statements; {blob} and {autoid} are filled in per dialect. Never edit a
# released migration: append a new one.
_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE tokens (
            token_hash {blob} PRIMARY KEY,
            created_at BIGINT NOT NULL,
            expires_at BIGINT NOT NULL,
            label TEXT NOT NULL,
            used_at BIGINT,
            device_id TEXT
        )""",
        """CREATE TABLE devices (
            device_id TEXT PRIMARY KEY,
            cert_fingerprint TEXT NOT NULL UNIQUE,
            cert_serial TEXT NOT NULL UNIQUE,
            identity_public_key {blob} NOT NULL,
            created_at BIGINT NOT NULL,
            revoked_at BIGINT
        )""",
        """CREATE TABLE rounds (
            round_id {autoid},
            cohort TEXT NOT NULL,
            status TEXT NOT NULL CHECK (status IN ('open', 'advertise_keys', 'share_keys', 'masked_input',
                                                   'consistency_check', 'unmask', 'published', 'aborted')),
            params TEXT NOT NULL,
            created_at BIGINT NOT NULL,
            updated_at BIGINT NOT NULL,
            finished_at BIGINT,
            model_version BIGINT,
            state {blob} NOT NULL,
            participants TEXT NOT NULL,
            version BIGINT NOT NULL
        )""",
        "CREATE UNIQUE INDEX rounds_one_active ON rounds (cohort) "
        "WHERE status NOT IN ('published', 'aborted')",
        """CREATE TABLE round_messages (
            round_id BIGINT NOT NULL REFERENCES rounds (round_id),
            stage TEXT NOT NULL,
            device_id TEXT NOT NULL,
            payload {blob} NOT NULL,
            created_at BIGINT NOT NULL,
            PRIMARY KEY (round_id, stage, device_id)
        )""",
        """CREATE TABLE responses (
            scope TEXT NOT NULL,
            request_id TEXT NOT NULL,
            request_digest {blob} NOT NULL,
            response {blob} NOT NULL,
            created_at BIGINT NOT NULL,
            PRIMARY KEY (scope, request_id)
        )""",
        "CREATE INDEX responses_created ON responses (created_at)",
        """CREATE TABLE models (
            version BIGINT PRIMARY KEY CHECK (version > 0),
            parent BIGINT,
            manifest TEXT NOT NULL,
            digest TEXT NOT NULL,
            blob {blob} NOT NULL,
            created_at BIGINT NOT NULL
        )""",
    ),
    (
        """CREATE TABLE leases (
            name TEXT PRIMARY KEY,
            owner TEXT NOT NULL,
            acquired_at BIGINT NOT NULL,
            expires_at BIGINT NOT NULL
        )""",
    ),
    # 3: where each model version came from. Versions stored before it are what a published round names
    # (``round:<id>``), or 'unrecorded' (an initial import whose file is not known any more).
    (
        "ALTER TABLE models ADD COLUMN origin TEXT NOT NULL DEFAULT 'unrecorded'",
        """UPDATE models SET origin = 'round:' || CAST((
            SELECT MIN(r.round_id) FROM rounds r
            WHERE r.model_version = models.version AND r.status = 'published'
        ) AS TEXT)
        WHERE EXISTS (
            SELECT 1 FROM rounds r WHERE r.model_version = models.version AND r.status = 'published'
        )""",
    ),
)

SCHEMA_VERSION = len(_MIGRATIONS)
"""The schema version this code creates and expects."""


def _to_db_time(value: dt.datetime) -> int:
    if not isinstance(value, dt.datetime) or value.tzinfo is None:
        raise StorageError("times must be timezone-aware datetimes")
    delta = value - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _from_db_time(value: int) -> dt.datetime:
    return _EPOCH + dt.timedelta(microseconds=int(value))


def _opt_time(value: int | None) -> dt.datetime | None:
    return None if value is None else _from_db_time(value)


def _text(value: object, what: str, *, empty: bool = False) -> str:
    if type(value) is not str or len(value) > _MAX_TEXT or (not value and not empty):
        raise StorageError(f"{what} must be a non-empty string of at most {_MAX_TEXT} characters")
    return value


def _blob(value: object, what: str) -> bytes:
    if type(value) is not bytes:
        raise StorageError(f"{what} must be bytes")
    return value


def _int(value: object, what: str, *, positive: bool = True) -> int:
    if type(value) is not int or (positive and value <= 0):
        raise StorageError(f"{what} must be a positive int")
    return value


def _dump_params(params: Mapping[str, JsonValue]) -> str:
    if not isinstance(params, Mapping):
        raise StorageError("round params must be a mapping")
    try:
        return json.dumps(dict(params), sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise StorageError("round params are not JSON-serializable") from exc


_ROUND_COLUMNS = (
    "round_id, cohort, status, params, created_at, updated_at, finished_at, model_version, state, "
    "participants, version"
)
_DEVICE_COLUMNS = "device_id, cert_fingerprint, cert_serial, identity_public_key, created_at, revoked_at"
_TOKEN_COLUMNS = "token_hash, created_at, expires_at, label, used_at, device_id"  # noqa: S105


# What reading a damaged row back raises (a flipped byte turns a number into text, text into invalid UTF-8,
# JSON into garbage, a status into an unknown word ...): each becomes one StorageCorruptError.
_DAMAGED = (ValueError, TypeError, KeyError, IndexError, OverflowError, UnicodeDecodeError)


def _col_str(value: object) -> str:
    if type(value) is not str:
        raise TypeError("text column holds another type")
    return value


def _col_int(value: object) -> int:
    if type(value) is not int:
        raise TypeError("integer column holds another type")
    return value


def _col_bytes(value: object) -> bytes:
    if not isinstance(value, bytes | memoryview):
        raise TypeError("blob column holds another type")
    return bytes(value)


def _opt_col_time(value: object) -> dt.datetime | None:
    return None if value is None else _from_db_time(_col_int(value))


def _decoded(what: str, fn: Callable[[Any], T], row: Any) -> T:
    """``fn(row)``, with any sign of a damaged row turned into :class:`StorageCorruptError`."""
    try:
        return fn(row)
    except _DAMAGED:
        raise StorageCorruptError(f"a stored {what} record is damaged; restore the database") from None


def _round_fields(row: Sequence[Any]) -> RoundRecord:
    participants = json.loads(_col_str(row[9]))
    if not isinstance(participants, list) or not all(type(p) is str for p in participants):
        raise ValueError("participants are not a list of ids")
    params = json.loads(_col_str(row[3]))
    if not isinstance(params, dict):
        raise ValueError("round params are not a mapping")
    return RoundRecord(
        round_id=_col_int(row[0]),
        cohort=_col_str(row[1]),
        status=Stage.from_key(_col_str(row[2])),
        params=params,
        created_at=_from_db_time(_col_int(row[4])),
        updated_at=_from_db_time(_col_int(row[5])),
        finished_at=_opt_col_time(row[6]),
        model_version=None if row[7] is None else _col_int(row[7]),
        state=_col_bytes(row[8]),
        participants=tuple(participants),
        version=_col_int(row[10]),
    )


def _round(row: Sequence[Any]) -> RoundRecord:
    return _decoded("round", _round_fields, row)


def _device_fields(row: Sequence[Any]) -> DeviceRecord:
    return DeviceRecord(
        device_id=_col_str(row[0]),
        cert_fingerprint=_col_str(row[1]),
        cert_serial=int(_col_str(row[2]), 16),
        identity_public_key=_col_bytes(row[3]),
        created_at=_from_db_time(_col_int(row[4])),
        revoked_at=_opt_col_time(row[5]),
    )


def _device(row: Sequence[Any]) -> DeviceRecord:
    return _decoded("device", _device_fields, row)


def _token_fields(row: Sequence[Any]) -> TokenRecord:
    return TokenRecord(
        token_hash=_col_bytes(row[0]),
        created_at=_from_db_time(_col_int(row[1])),
        expires_at=_from_db_time(_col_int(row[2])),
        label=_col_str(row[3]),
        used_at=_opt_col_time(row[4]),
        device_id=None if row[5] is None else _col_str(row[5]),
    )


def _token(row: Sequence[Any]) -> TokenRecord:
    return _decoded("token", _token_fields, row)


def _response(scope: str, request_id: str, row: Sequence[Any]) -> ResponseRecord:
    def fields(r: Sequence[Any]) -> ResponseRecord:
        return ResponseRecord(
            scope=scope,
            request_id=request_id,
            request_digest=_col_bytes(r[0]),
            response=_col_bytes(r[1]),
            created_at=_from_db_time(_col_int(r[2])),
        )

    return _decoded("response", fields, row)


_MODEL_COLUMNS = "version, parent, manifest, digest, blob, created_at, origin"
_MODEL_INFO_COLUMNS = "version, parent, manifest, digest, created_at, origin"


def _model(row: Sequence[Any]) -> ModelRecord:
    def fields(r: Sequence[Any]) -> ModelRecord:
        return ModelRecord(
            version=_col_int(r[0]),
            parent=None if r[1] is None else _col_int(r[1]),
            manifest=_col_str(r[2]),
            digest=_col_str(r[3]),
            blob=_col_bytes(r[4]),
            created_at=_from_db_time(_col_int(r[5])),
            origin=_col_str(r[6]),
        )

    return _decoded("model", fields, row)


def _model_info(row: Sequence[Any]) -> ModelInfo:
    def fields(r: Sequence[Any]) -> ModelInfo:
        return ModelInfo(
            version=_col_int(r[0]),
            parent=None if r[1] is None else _col_int(r[1]),
            manifest=_col_str(r[2]),
            digest=_col_str(r[3]),
            created_at=_from_db_time(_col_int(r[4])),
            origin=_col_str(r[5]),
        )

    return _decoded("model", fields, row)


def _ints(what: str, rows: Sequence[Any], parse: Callable[[Any], int] = _col_int) -> list[int]:
    return _decoded(what, lambda rs: [parse(r[0]) for r in rs], rows)


def _model_row(model: object) -> tuple[Any, ...]:
    """The ``models`` row of a :class:`ModelRecord`, validated."""
    if not isinstance(model, ModelRecord):
        raise StorageError("model must be a ModelRecord")
    version = _int(model.version, "model version")
    parent = None if model.parent is None else _int(model.parent, "parent version")
    if type(model.manifest) is not str or type(model.digest) is not str:
        raise StorageError("manifest and digest must be strings")
    return (
        version,
        parent,
        model.manifest,
        model.digest,
        _blob(model.blob, "blob"),
        _to_db_time(model.created_at),
        _text(model.origin, "model origin"),
    )


def _round_change(
    *,
    now: dt.datetime,
    status: Stage | None = None,
    state: bytes | None = None,
    participants: Sequence[str] | None = None,
    model_version: int | None = None,
) -> tuple[list[str], list[Any]]:
    """The ``SET`` clauses and values of one round update (every update bumps the version)."""
    sets = ["version = version + 1", "updated_at = ?"]
    values: list[Any] = [_to_db_time(now)]
    if status is not None:
        if not isinstance(status, Stage) or status is Stage.IDLE:
            raise StorageError("status must be the Stage of a round")
        sets.append("status = ?")
        values.append(status.key)
        if status.terminal:
            sets.append("finished_at = ?")
            values.append(_to_db_time(now))
    if state is not None:
        sets.append("state = ?")
        values.append(_blob(state, "state"))
    if participants is not None:
        if isinstance(participants, str):
            raise StorageError("participants must be a sequence of device ids")
        ids = sorted({_text(p, "participant") for p in participants})
        sets.append("participants = ?")
        values.append(json.dumps(ids))
    if model_version is not None:
        sets.append("model_version = ?")
        values.append(_int(model_version, "model version"))
    return sets, values


def _update_round_in(
    cur: Cursor, round_id: int, expected_version: int, change: tuple[list[str], list[Any]]
) -> RoundRecord:
    """Apply a compare-and-set round update inside the caller's transaction (raising rolls it back)."""
    _int(round_id, "round id")
    _int(expected_version, "expected version")
    sets, values = change
    cur.execute(
        f"UPDATE rounds SET {', '.join(sets)} "
        "WHERE round_id = ? AND version = ? AND status NOT IN ('published', 'aborted')",
        [*values, round_id, expected_version],
    )
    updated = cur.rowcount == 1
    cur.execute(f"SELECT {_ROUND_COLUMNS} FROM rounds WHERE round_id = ?", (round_id,))
    row = cur.fetchone()
    if row is None:
        raise NotFoundError("no such round")
    if not updated:
        raise ConflictError("round changed concurrently or is finished")
    return _round(row)


def _lease(row: Sequence[Any]) -> LeaseRecord:
    def fields(r: Sequence[Any]) -> LeaseRecord:
        return LeaseRecord(
            name=_col_str(r[0]),
            owner=_col_str(r[1]),
            acquired_at=_from_db_time(_col_int(r[2])),
            expires_at=_from_db_time(_col_int(r[3])),
        )

    return _decoded("lease", fields, row)


class SqlStorage(Storage):
    """Shared SQL logic; subclasses provide the connection and dialect details."""

    _blob_type: str
    _autoid_type: str

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._closed = False

    # -- backend hooks ------------------------------------------------------------------------------------

    @abc.abstractmethod
    def _begin(self, *, write: bool) -> contextlib.AbstractContextManager[Cursor]:
        """Open a transaction and yield a cursor; commit on success, roll back on error."""

    @abc.abstractmethod
    def _is_integrity_error(self, exc: BaseException) -> bool:
        """True if ``exc`` is the driver's constraint-violation error."""

    @abc.abstractmethod
    def _close_connection(self) -> None:
        """Close the driver connection."""

    @abc.abstractmethod
    def _lock_schema(self, cur: Cursor) -> None:
        """Serialise concurrent migrations (called first inside the migration transaction)."""

    @abc.abstractmethod
    def _schema_exists(self, cur: Cursor) -> bool:
        """True if the database already holds the fedfer schema (its ``schema_migrations`` table)."""

    @abc.abstractmethod
    def _no_schema_message(self) -> str:
        """Why an existing deployment's database without the schema is refused, and what to do."""

    # -- plumbing -----------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _tx(self, *, write: bool = True) -> Iterator[Cursor]:
        with self._lock:
            if self._closed:
                raise StorageError("storage is closed")
            with self._begin(write=write) as cur:
                yield cur

    def _migrate(self, now: dt.datetime, *, create: bool) -> None:
        """Bring the schema up to date; without ``create``, refuse a database that has none at all (an
        existing deployment whose database was emptied or replaced must not start as a new one)."""
        with self._tx() as cur:
            self._lock_schema(cur)
            if not create and not self._schema_exists(cur):
                raise StorageError(self._no_schema_message())
            cur.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations "
                "(version INTEGER PRIMARY KEY, applied_at BIGINT)"
            )
            cur.execute("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")
            current = _decoded("schema", lambda r: _col_int(r[0]), cur.fetchone())
            if current > SCHEMA_VERSION:
                raise StorageError("database schema is newer than this fedfer version")
            for number in range(current + 1, SCHEMA_VERSION + 1):
                for statement in _MIGRATIONS[number - 1]:
                    cur.execute(statement.format(blob=self._blob_type, autoid=self._autoid_type))
                cur.execute(
                    "INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)",
                    (number, _to_db_time(now)),
                )

    def close(self) -> None:
        """Release the connection. Further calls raise :class:`StorageError`."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._close_connection()

    def schema_version(self) -> int:
        """Return the schema version the database is migrated to."""
        with self._tx(write=False) as cur:
            cur.execute("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")
            return _decoded("schema", lambda r: _col_int(r[0]), cur.fetchone())

    # -- tokens -------------------------------------------------------------------------------------------

    def add_token(self, token: TokenRecord) -> None:
        """Store a new, unused enrollment token."""
        if not isinstance(token, TokenRecord):
            raise StorageError("token must be a TokenRecord")
        if token.used_at is not None or token.device_id is not None:
            raise StorageError("a new token must be unused")
        params = (
            _blob(token.token_hash, "token hash"),
            _to_db_time(token.created_at),
            _to_db_time(token.expires_at),
            _text(token.label, "label", empty=True),
        )
        try:
            with self._tx() as cur:
                cur.execute(
                    "INSERT INTO tokens (token_hash, created_at, expires_at, label) VALUES (?, ?, ?, ?)",
                    params,
                )
        except Exception as exc:
            if self._is_integrity_error(exc):
                raise ConflictError("enrollment token already exists") from None
            raise

    def get_token(self, token_hash: bytes) -> TokenRecord | None:
        """Return the token with this hash, or None."""
        with self._tx(write=False) as cur:
            cur.execute(
                f"SELECT {_TOKEN_COLUMNS} FROM tokens WHERE token_hash = ?", (_blob(token_hash, "hash"),)
            )
            row = cur.fetchone()
        return None if row is None else _token(row)

    def spend_token(self, token_hash: bytes, *, now: dt.datetime) -> bool:
        """Mark an unused, unexpired token used without registering a device."""
        ts = _to_db_time(now)
        with self._tx() as cur:
            cur.execute(
                "UPDATE tokens SET used_at = ? WHERE token_hash = ? AND used_at IS NULL AND expires_at > ?",
                (ts, _blob(token_hash, "token hash"), ts),
            )
            return int(cur.rowcount) == 1

    def delete_expired_tokens(self, *, now: dt.datetime) -> int:
        """Delete unused tokens that expired before ``now``; return how many were deleted."""
        with self._tx() as cur:
            cur.execute("DELETE FROM tokens WHERE used_at IS NULL AND expires_at <= ?", (_to_db_time(now),))
            return int(cur.rowcount)

    # -- devices ------------------------------------------------------------------------------------------

    def enroll_device(self, *, token_hash: bytes, device: DeviceRecord, now: dt.datetime) -> DeviceRecord:
        """Atomically consume an unused, unexpired token and register ``device``."""
        if not isinstance(device, DeviceRecord):
            raise StorageError("device must be a DeviceRecord")
        if device.revoked_at is not None:
            raise StorageError("a new device cannot be revoked")
        ts = _to_db_time(now)
        row = (
            _text(device.device_id, "device id"),
            _text(device.cert_fingerprint, "fingerprint"),
            format(_int(device.cert_serial, "serial"), "x"),
            _blob(device.identity_public_key, "identity key"),
            _to_db_time(device.created_at),
        )
        try:
            with self._tx() as cur:
                cur.execute(
                    "UPDATE tokens SET used_at = ?, device_id = ? "
                    "WHERE token_hash = ? AND used_at IS NULL AND expires_at > ?",
                    (ts, device.device_id, _blob(token_hash, "token hash"), ts),
                )
                if cur.rowcount != 1:
                    raise ConflictError("enrollment token is invalid, expired or already used")
                cur.execute(f"INSERT INTO devices ({_DEVICE_COLUMNS}) VALUES (?, ?, ?, ?, ?, NULL)", row)
        except Exception as exc:
            if self._is_integrity_error(exc):
                raise ConflictError("device id or certificate is already registered") from None
            raise
        return device

    def get_device(self, device_id: str) -> DeviceRecord | None:
        """Return the device with this id, or None."""
        with self._tx(write=False) as cur:
            cur.execute(
                f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE device_id = ?", (_text(device_id, "id"),)
            )
            row = cur.fetchone()
        return None if row is None else _device(row)

    def list_devices(self, *, include_revoked: bool = True) -> list[DeviceRecord]:
        """Return registered devices ordered by id."""
        where = "" if include_revoked else " WHERE revoked_at IS NULL"
        with self._tx(write=False) as cur:
            cur.execute(f"SELECT {_DEVICE_COLUMNS} FROM devices{where} ORDER BY device_id")
            return [_device(r) for r in cur.fetchall()]

    def revoke_device(self, device_id: str, *, now: dt.datetime) -> DeviceRecord:
        """Mark a device revoked (idempotent: a second call keeps the first time)."""
        ts = _to_db_time(now)
        with self._tx() as cur:
            cur.execute(
                "UPDATE devices SET revoked_at = COALESCE(revoked_at, ?) WHERE device_id = ?",
                (ts, _text(device_id, "device id")),
            )
            if cur.rowcount != 1:
                raise NotFoundError("no such device")
            cur.execute(f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE device_id = ?", (device_id,))
            return _device(cur.fetchone())

    def revoked_serials(self) -> frozenset[int]:
        """Return the certificate serial numbers of all revoked devices."""
        with self._tx(write=False) as cur:
            cur.execute("SELECT cert_serial FROM devices WHERE revoked_at IS NOT NULL")
            return frozenset(_ints("device", cur.fetchall(), lambda v: int(_col_str(v), 16)))

    # -- rounds -------------------------------------------------------------------------------------------

    def create_round(
        self,
        *,
        params: Mapping[str, JsonValue],
        now: dt.datetime,
        cohort: str = "default",
        state: bytes = b"",
    ) -> RoundRecord:
        """Open a new round with status ``OPEN`` and version 1."""
        ts = _to_db_time(now)
        values = (_text(cohort, "cohort"), _dump_params(params), ts, ts, _blob(state, "state"))
        try:
            with self._tx() as cur:
                cur.execute(
                    "INSERT INTO rounds (cohort, status, params, created_at, updated_at, state, "
                    "participants, version) VALUES (?, 'open', ?, ?, ?, ?, '[]', 1) RETURNING "
                    + _ROUND_COLUMNS,
                    values,
                )
                return _round(cur.fetchone())
        except Exception as exc:
            if self._is_integrity_error(exc):
                raise ConflictError("the cohort already has an active round") from None
            raise

    def get_round(self, round_id: int) -> RoundRecord | None:
        """Return the round with this id, or None."""
        with self._tx(write=False) as cur:
            cur.execute(
                f"SELECT {_ROUND_COLUMNS} FROM rounds WHERE round_id = ?",
                (_int(round_id, "round id"),),
            )
            row = cur.fetchone()
        return None if row is None else _round(row)

    def active_round(self, cohort: str = "default") -> RoundRecord | None:
        """Return the cohort's round that is not yet published or aborted, or None."""
        with self._tx(write=False) as cur:
            cur.execute(
                f"SELECT {_ROUND_COLUMNS} FROM rounds "
                "WHERE cohort = ? AND status NOT IN ('published', 'aborted')",
                (_text(cohort, "cohort"),),
            )
            row = cur.fetchone()
        return None if row is None else _round(row)

    def list_rounds(self, *, cohort: str | None = None, limit: int = 100) -> list[RoundRecord]:
        """Return the most recent rounds, newest first."""
        _int(limit, "limit")
        with self._tx(write=False) as cur:
            if cohort is None:
                cur.execute(
                    f"SELECT {_ROUND_COLUMNS} FROM rounds ORDER BY round_id DESC LIMIT ?",
                    (limit,),
                )
            else:
                cur.execute(
                    f"SELECT {_ROUND_COLUMNS} FROM rounds WHERE cohort = ? ORDER BY round_id DESC LIMIT ?",
                    (_text(cohort, "cohort"), limit),
                )
            return [_round(r) for r in cur.fetchall()]

    def update_round(
        self,
        round_id: int,
        *,
        expected_version: int,
        now: dt.datetime,
        status: Stage | None = None,
        state: bytes | None = None,
        participants: Sequence[str] | None = None,
        model_version: int | None = None,
    ) -> RoundRecord:
        """Compare-and-set: change the round only if its version is still ``expected_version``."""
        change = _round_change(
            now=now, status=status, state=state, participants=participants, model_version=model_version
        )
        with self._tx() as cur:
            return _update_round_in(cur, round_id, expected_version, change)

    def publish_round(
        self,
        round_id: int,
        *,
        expected_version: int,
        now: dt.datetime,
        model: ModelRecord,
        participants: Sequence[str],
    ) -> RoundRecord:
        """In one transaction: store ``model`` as a new version and mark the round ``PUBLISHED`` with it."""
        row = _model_row(model)
        change = _round_change(
            now=now, status=Stage.FINISHED, participants=participants, model_version=model.version
        )
        try:
            with self._tx() as cur:
                cur.execute(f"INSERT INTO models ({_MODEL_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)", row)
                return _update_round_in(cur, round_id, expected_version, change)
        except Exception as exc:
            if self._is_integrity_error(exc):
                raise ConflictError("model version already exists") from None
            raise

    def put_round_message(
        self, round_id: int, *, stage: Stage, device_id: str, payload: bytes, now: dt.datetime
    ) -> bool:
        """Store one device's message for one stage of a round, first write wins."""
        if not isinstance(stage, Stage) or not stage.collecting:
            raise StorageError("stage must be a collecting Stage")
        key = (_int(round_id, "round id"), stage.key, _text(device_id, "device id"))
        payload = _blob(payload, "payload")
        with self._tx() as cur:
            cur.execute("SELECT status FROM rounds WHERE round_id = ?", (round_id,))
            found = cur.fetchone()
            if found is None:
                raise NotFoundError("no such round")
            if found[0] in _TERMINAL:
                raise ConflictError("round is finished")
            cur.execute(
                "INSERT INTO round_messages (round_id, stage, device_id, payload, created_at) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (round_id, stage, device_id) DO NOTHING",
                (*key, payload, _to_db_time(now)),
            )
            if cur.rowcount == 1:
                return True
            cur.execute(
                "SELECT payload FROM round_messages WHERE round_id = ? AND stage = ? AND device_id = ?", key
            )
            existing = _decoded("round message", lambda r: _col_bytes(r[0]), cur.fetchone())
        if existing != payload:
            raise ConflictError("a different message is already stored for this device and stage")
        return False

    def round_messages(
        self, round_id: int, *, stage: Stage, device_ids: Collection[str] | None = None
    ) -> dict[str, bytes]:
        """Return ``{device_id: payload}`` of the messages stored for one stage of a round."""
        if not isinstance(stage, Stage):
            raise StorageError("stage must be a Stage")
        key = (_int(round_id, "round id"), stage.key)
        if device_ids is None:
            with self._tx(write=False) as cur:
                cur.execute(
                    "SELECT device_id, payload FROM round_messages WHERE round_id = ? AND stage = ? "
                    "ORDER BY device_id",
                    key,
                )
                return _decoded(
                    "round message", lambda rs: {_col_str(r[0]): _col_bytes(r[1]) for r in rs}, cur.fetchall()
                )
        if isinstance(device_ids, str):
            raise StorageError("device_ids must be a collection of device ids")
        wanted = sorted({_text(d, "device id") for d in device_ids})
        found: dict[str, bytes] = {}
        with self._tx(write=False) as cur:
            for start in range(0, len(wanted), _IN_BATCH):
                batch = wanted[start : start + _IN_BATCH]
                cur.execute(
                    "SELECT device_id, payload FROM round_messages WHERE round_id = ? AND stage = ? "
                    f"AND device_id IN ({', '.join('?' * len(batch))}) ORDER BY device_id",
                    (*key, *batch),
                )
                found.update(
                    _decoded(
                        "round message",
                        lambda rs: [(_col_str(r[0]), _col_bytes(r[1])) for r in rs],
                        cur.fetchall(),
                    )
                )
        return found

    def round_message_senders(self, round_id: int, *, stage: Stage) -> frozenset[str]:
        """Return the ids of the devices that have a message stored for one stage of a round."""
        if not isinstance(stage, Stage):
            raise StorageError("stage must be a Stage")
        with self._tx(write=False) as cur:
            cur.execute(
                "SELECT device_id FROM round_messages WHERE round_id = ? AND stage = ?",
                (_int(round_id, "round id"), stage.key),
            )
            rows = cur.fetchall()
        return frozenset(_decoded("round message", lambda rs: [_col_str(r[0]) for r in rs], rows))

    # -- idempotency --------------------------------------------------------------------------------------

    def record_response(
        self, *, scope: str, request_id: str, request_digest: bytes, response: bytes, now: dt.datetime
    ) -> ResponseRecord:
        """Record the response to a request id unless one is recorded; return the record that won."""
        key = (_text(scope, "scope"), _text(request_id, "request id"))
        digest = _blob(request_digest, "request digest")
        with self._tx() as cur:
            cur.execute(
                "INSERT INTO responses (scope, request_id, request_digest, response, created_at) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (scope, request_id) DO NOTHING",
                (*key, digest, _blob(response, "response"), _to_db_time(now)),
            )
            cur.execute(
                "SELECT request_digest, response, created_at FROM responses "
                "WHERE scope = ? AND request_id = ?",
                key,
            )
            row = cur.fetchone()
        record = _response(scope, request_id, row)
        if record.request_digest != digest:
            raise ConflictError("request id was already used for a different request")
        return record

    def get_response(self, *, scope: str, request_id: str) -> ResponseRecord | None:
        """Return the recorded response for a request id, or None."""
        key = (_text(scope, "scope"), _text(request_id, "request id"))
        with self._tx(write=False) as cur:
            cur.execute(
                "SELECT request_digest, response, created_at FROM responses "
                "WHERE scope = ? AND request_id = ?",
                key,
            )
            row = cur.fetchone()
        return None if row is None else _response(scope, request_id, row)

    def delete_responses_before(self, *, before: dt.datetime) -> int:
        """Forget idempotency records created before ``before``; return how many."""
        with self._tx() as cur:
            cur.execute("DELETE FROM responses WHERE created_at < ?", (_to_db_time(before),))
            return int(cur.rowcount)

    # -- leases -------------------------------------------------------------------------------------------

    def acquire_lease(self, name: str, *, owner: str, now: dt.datetime, ttl: dt.timedelta) -> LeaseRecord:
        """Take the lease ``name`` for ``owner`` until ``now + ttl``, or renew it if ``owner`` holds it."""
        if not isinstance(ttl, dt.timedelta) or ttl <= dt.timedelta(0):
            raise StorageError("lease ttl must be a positive timedelta")
        key = _text(name, "lease name")
        start = _to_db_time(now)
        with self._tx() as cur:
            # The upsert's WHERE is evaluated against the row as it is when the statement runs, so the
            # holder changes only if it is the caller or its lease has expired: no read-then-write race.
            cur.execute(
                "INSERT INTO leases (name, owner, acquired_at, expires_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (name) DO UPDATE SET owner = excluded.owner, "
                "acquired_at = CASE WHEN leases.owner = excluded.owner THEN leases.acquired_at "
                "ELSE excluded.acquired_at END, expires_at = excluded.expires_at "
                "WHERE leases.owner = excluded.owner OR leases.expires_at <= excluded.acquired_at",
                (key, _text(owner, "lease owner"), start, _to_db_time(now + ttl)),
            )
            cur.execute("SELECT name, owner, acquired_at, expires_at FROM leases WHERE name = ?", (key,))
            return _lease(cur.fetchone())

    def release_lease(self, name: str, *, owner: str) -> bool:
        """Give the lease up if ``owner`` holds it."""
        with self._tx() as cur:
            cur.execute(
                "DELETE FROM leases WHERE name = ? AND owner = ?",
                (_text(name, "lease name"), _text(owner, "lease owner")),
            )
            return int(cur.rowcount) == 1

    def get_lease(self, name: str) -> LeaseRecord | None:
        """Return the lease ``name``, or None if nobody has taken it."""
        with self._tx(write=False) as cur:
            cur.execute(
                "SELECT name, owner, acquired_at, expires_at FROM leases WHERE name = ?",
                (_text(name, "lease name"),),
            )
            row = cur.fetchone()
        return None if row is None else _lease(row)

    # -- models -------------------------------------------------------------------------------------------

    def put_model(self, model: ModelRecord) -> bool:
        """Store a model version, first write wins."""
        row = _model_row(model)
        with self._tx() as cur:
            cur.execute(
                f"INSERT INTO models ({_MODEL_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (version) DO NOTHING",
                row,
            )
            if cur.rowcount == 1:
                return True
            cur.execute("SELECT digest FROM models WHERE version = ?", (row[0],))
            existing = _decoded("model", lambda r: _col_str(r[0]), cur.fetchone())
        if existing != model.digest:
            raise ConflictError("model version already exists with different content")
        return False

    def get_model(self, version: int) -> ModelRecord | None:
        """Return one model version, or None."""
        with self._tx(write=False) as cur:
            cur.execute(
                f"SELECT {_MODEL_COLUMNS} FROM models WHERE version = ?", (_int(version, "model version"),)
            )
            row = cur.fetchone()
        return None if row is None else _model(row)

    def latest_model_version(self) -> int | None:
        """Return the highest stored model version, or None when the registry is empty."""
        with self._tx(write=False) as cur:
            cur.execute("SELECT MAX(version) FROM models")
            value = cur.fetchone()[0]
        return None if value is None else _decoded("model", _col_int, value)

    def list_model_versions(self) -> list[int]:
        """Return every stored model version, ascending."""
        with self._tx(write=False) as cur:
            cur.execute("SELECT version FROM models ORDER BY version")
            return _ints("model", cur.fetchall())

    def list_models(self) -> list[ModelInfo]:
        """Return every stored model version without its blob, ascending."""
        with self._tx(write=False) as cur:
            cur.execute(f"SELECT {_MODEL_INFO_COLUMNS} FROM models ORDER BY version")
            return [_model_info(r) for r in cur.fetchall()]
