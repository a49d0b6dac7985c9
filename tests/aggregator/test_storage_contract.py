"""One contract for every storage backend, run against SQLite and a real PostgreSQL server."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import signal
import stat
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import psycopg
import pytest

from fedfer.aggregator.storage import (
    ConflictError,
    DeviceRecord,
    LeaseRecord,
    ModelInfo,
    ModelRecord,
    NotFoundError,
    Storage,
    StorageCorruptError,
    StorageError,
    TokenRecord,
    open_storage,
    redact_url,
)
from fedfer.aggregator.storage.postgres import PostgresStorage
from fedfer.aggregator.storage.sql import _MIGRATIONS, SCHEMA_VERSION
from fedfer.aggregator.storage.sqlite import SqliteStorage
from fedfer.security.secagg import Stage
from tests.postgres import PostgresServer
from tests.sqlite_damage import zero_btree_page

T = TypeVar("T")
NOW = dt.datetime(2026, 11, 22, 3, 0, 0, 123456, tzinfo=dt.UTC)
HOUR = dt.timedelta(hours=1)
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def store(storage_url: str) -> Iterator[Storage]:
    with open_storage(storage_url, now=NOW, create=True) as storage:
        yield storage


def token(n: int = 1, *, expires: dt.datetime = NOW + HOUR) -> TokenRecord:
    return TokenRecord(token_hash=bytes([n]) * 32, created_at=NOW, expires_at=expires, label=f"batch {n}")


def device(name: str = "dev-1", serial: int = 1) -> DeviceRecord:
    return DeviceRecord(
        device_id=name,
        cert_fingerprint=f"{serial:064x}",
        cert_serial=serial,
        identity_public_key=bytes([serial % 256]) * 32,
        created_at=NOW,
    )


def model(
    version: int, parent: int | None, digest: str, blob: bytes = b"", *, origin: str = "random:seed=0"
) -> ModelRecord:
    return ModelRecord(
        version=version, parent=parent, manifest="[]", digest=digest, blob=blob, created_at=NOW, origin=origin
    )


def race(n: int, fn: Callable[[int], T]) -> list[T | BaseException]:
    """Run fn(0..n-1) in n threads released together; return each result or exception."""
    barrier = threading.Barrier(n)
    out: list[T | BaseException] = [RuntimeError("not run")] * n

    def worker(i: int) -> None:
        barrier.wait()
        try:
            out[i] = fn(i)
        except BaseException as exc:
            out[i] = exc

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out


# -- opening ------------------------------------------------------------------------------------------------


def test_schema_is_migrated_once_and_reopen_keeps_data(storage_url: str) -> None:
    with open_storage(storage_url, now=NOW, create=True) as s:
        assert s.schema_version() == SCHEMA_VERSION
        s.add_token(token())
    with open_storage(storage_url, now=NOW + HOUR) as s:
        assert s.schema_version() == SCHEMA_VERSION
        assert s.get_token(token().token_hash) == token()


def test_closed_storage_refuses_calls(store: Storage) -> None:
    store.close()
    with pytest.raises(StorageError):
        store.get_device("dev-1")
    store.close()  # idempotent


def test_bad_urls_are_refused_without_leaking_passwords(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="scheme"):
        open_storage("mysql://u:pw@host/db")
    with pytest.raises(StorageError) as info:
        open_storage("ftp://user:hunter2@host/db")
    assert "hunter2" not in str(info.value)
    assert redact_url("postgresql://u:secret@h:5/db") == "postgresql://u:***@h:5/db"
    with pytest.raises(StorageError):
        open_storage("sqlite::memory:")
    with pytest.raises(StorageError, match="directory"):
        open_storage(f"sqlite://{tmp_path / 'missing' / 'x.db'}")
    for query in ("?synchronous=off", "?journal_mode=delete", "?synchronous=full&synchronous=normal", "?x"):
        with pytest.raises(StorageError):
            open_storage(f"sqlite://{tmp_path / 'q.db'}{query}")


def _schema_tables(url: str) -> int:
    if url.startswith("sqlite:"):
        import sqlite3

        with contextlib.closing(sqlite3.connect(url.removeprefix("sqlite://"))) as conn:
            return int(conn.execute("SELECT COUNT(*) FROM sqlite_master WHERE type = 'table'").fetchone()[0])
    with psycopg.connect(url, autocommit=True) as pg:
        row = pg.execute("SELECT COUNT(*) FROM pg_tables WHERE schemaname = 'public'").fetchone()
        return int(row[0]) if row is not None else 0


def test_only_create_makes_a_new_database_an_existing_deployment_never_starts_empty(storage_url: str) -> None:
    with pytest.raises(StorageError, match="refusing to start an empty deployment") as info:
        open_storage(storage_url, now=NOW)
    assert "Traceback" not in str(info.value) and "secret" not in str(info.value)
    if storage_url.startswith("sqlite:"):
        assert not Path(storage_url.removeprefix("sqlite://")).exists()  # nothing was created
    else:
        assert _schema_tables(storage_url) == 0
    with open_storage(storage_url, now=NOW, create=True) as s:
        s.add_token(token())
    with open_storage(storage_url, now=NOW) as s:  # an existing deployment's database opens as it is
        assert s.get_token(token().token_hash) == token()


def test_a_damaged_record_reads_as_storage_corrupt_error_not_a_decoding_traceback(storage_url: str) -> None:
    with open_storage(storage_url, now=NOW, create=True) as s:
        first = s.create_round(params={"base_version": 1}, now=NOW)
        s.enroll_device(token_hash=_token_for(s).token_hash, device=device(), now=NOW)
        damage = ["UPDATE rounds SET params = '{\"base_version\": ' WHERE round_id = ?"]
        if storage_url.startswith("sqlite:"):
            import sqlite3

            with contextlib.closing(sqlite3.connect(storage_url.removeprefix("sqlite://"))) as raw:
                raw.execute(damage[0], (first.round_id,))
                raw.execute("UPDATE devices SET cert_fingerprint = CAST(x'ff00fe' AS TEXT)")  # not UTF-8
                raw.execute("UPDATE devices SET created_at = 'yesterday'")
                raw.commit()
        else:
            with psycopg.connect(storage_url, autocommit=True) as pg:
                pg.execute(damage[0].replace("?", "%s"), (first.round_id,))
        with pytest.raises(StorageCorruptError, match="stored round record is damaged"):
            s.get_round(first.round_id)
        with pytest.raises(StorageCorruptError, match="round"):
            s.list_rounds()
        if storage_url.startswith("sqlite:"):
            with pytest.raises(StorageCorruptError):
                s.list_devices()
        assert s.latest_model_version() is None  # the rest of the store still works


def _token_for(s: Storage) -> TokenRecord:
    s.add_token(token(7))
    return token(7)


def _sqlite_deployment(tmp_path: Path) -> Path:
    tmp_path.mkdir(exist_ok=True)
    path = tmp_path / "agg.db"
    with open_storage(f"sqlite://{path}", now=NOW, create=True) as s:
        for i in range(1, 40):
            s.add_token(token(i))
            s.put_model(model(i, None, f"{i:02x}", os.urandom(3000)))
    for suffix in ("-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    return path


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("empty", "is empty \\(0 bytes\\)"),
        ("truncated", "truncated"),
        ("not sqlite", "not an SQLite database"),
        ("zeroed b-tree page", "fails its integrity check"),
        ("missing", "no SQLite database"),
    ],
)
def test_a_damaged_sqlite_file_is_refused_at_open_and_kept_as_it_is(
    tmp_path: Path, damage: str, message: str
) -> None:
    path = _sqlite_deployment(tmp_path)
    data = path.read_bytes()
    if damage == "empty":
        path.write_bytes(b"")
    elif damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "not sqlite":
        path.write_bytes(os.urandom(len(data)))
    elif damage == "zeroed b-tree page":
        zero_btree_page(path, "models")
    else:
        path.unlink()
    before = path.read_bytes() if path.exists() else None
    with pytest.raises(StorageError, match=message):
        open_storage(f"sqlite://{path}", now=NOW)
    assert (path.read_bytes() if path.exists() else None) == before  # nothing was written or replaced


def test_random_byte_flips_give_a_storage_error_never_another_exception(tmp_path: Path) -> None:
    """50 flipped bits anywhere in the file, eight times: every failure is a StorageError with a message.

    Flips inside model blobs or free pages are invisible to SQLite (the registry's digest catches the former),
    so some runs open and read fine; most are refused at open (header check or quick_check).
    """
    refused = 0
    for seed in range(8):
        path = _sqlite_deployment(tmp_path / str(seed))
        data = bytearray(path.read_bytes())
        rng = random_generator(seed)
        for pos in rng.choice(len(data), size=50, replace=False):
            data[pos] ^= 1 << int(rng.integers(8))
        path.write_bytes(bytes(data))
        try:
            with open_storage(f"sqlite://{path}", now=NOW) as s:
                s.list_model_versions()
                for v in range(1, 40):
                    s.get_model(v)
                s.list_devices()
                s.add_token(token(99))
        except StorageError as exc:
            assert str(exc)
            refused += 1
    assert refused >= 4


def random_generator(seed: int):
    import numpy as np

    return np.random.default_rng(seed)


@pytest.mark.parametrize(("query", "level"), [("", 2), ("?synchronous=full", 2), ("?synchronous=normal", 1)])
def test_sqlite_durability_level_is_selectable(tmp_path: Path, query: str, level: int) -> None:
    with open_storage(f"sqlite://{tmp_path / 'd.db'}{query}", now=NOW, create=True) as s:
        assert isinstance(s, SqliteStorage)
        assert s._conn.execute("PRAGMA synchronous").fetchone()[0] == level


def test_sqlite_file_is_private_and_in_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "agg.db"
    with open_storage(f"sqlite://{path}", now=NOW, create=True) as s:
        s.add_token(token())
        for suffix in ("", "-wal", "-shm"):
            p = Path(str(path) + suffix)
            if p.exists():
                assert stat.S_IMODE(p.stat().st_mode) == 0o600, suffix
    import sqlite3

    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.close()


# -- tokens and devices -------------------------------------------------------------------------------------


def test_token_round_trip_and_duplicate(store: Storage) -> None:
    store.add_token(token())
    assert store.get_token(token().token_hash) == token()
    assert store.get_token(b"\x09" * 32) is None
    with pytest.raises(ConflictError):
        store.add_token(token())
    with pytest.raises(StorageError):
        store.add_token(TokenRecord(token_hash=b"\x05" * 32, created_at=NOW, expires_at=NOW, used_at=NOW))


def test_enroll_consumes_token_exactly_once(store: Storage) -> None:
    store.add_token(token())
    got = store.enroll_device(token_hash=token().token_hash, device=device(), now=NOW)
    assert got == device()
    assert store.get_device("dev-1") == device()
    used = store.get_token(token().token_hash)
    assert used is not None and used.used_at == NOW and used.device_id == "dev-1"
    with pytest.raises(ConflictError, match="token"):
        store.enroll_device(token_hash=token().token_hash, device=device("dev-2", 2), now=NOW)
    assert store.get_device("dev-2") is None
    # Cleaning up expired tokens keeps used ones (they record who enrolled with what).
    assert store.delete_expired_tokens(now=NOW + 10 * HOUR) == 0
    assert store.get_token(token().token_hash) == used


def test_expired_and_unknown_tokens_are_refused(store: Storage) -> None:
    store.add_token(token(1, expires=NOW + dt.timedelta(seconds=1)))
    with pytest.raises(ConflictError):
        store.enroll_device(
            token_hash=token(1).token_hash, device=device(), now=NOW + dt.timedelta(seconds=1)
        )
    with pytest.raises(ConflictError):
        store.enroll_device(token_hash=b"\x07" * 32, device=device(), now=NOW)
    assert store.list_devices() == []
    assert store.delete_expired_tokens(now=NOW + HOUR) == 1
    assert store.get_token(token(1).token_hash) is None


def test_refused_registration_leaves_token_usable(store: Storage) -> None:
    store.add_token(token(1))
    store.add_token(token(2))
    store.enroll_device(token_hash=token(1).token_hash, device=device("dev-1", 1), now=NOW)
    # Same device id again, and a different id with an already registered serial: both refused.
    with pytest.raises(ConflictError, match="already registered"):
        store.enroll_device(token_hash=token(2).token_hash, device=device("dev-1", 2), now=NOW)
    with pytest.raises(ConflictError, match="already registered"):
        store.enroll_device(token_hash=token(2).token_hash, device=device("dev-2", 1), now=NOW)
    unused = store.get_token(token(2).token_hash)
    assert unused is not None and unused.used_at is None
    store.enroll_device(token_hash=token(2).token_hash, device=device("dev-2", 2), now=NOW)
    assert [d.device_id for d in store.list_devices()] == ["dev-1", "dev-2"]


def test_a_spent_token_cannot_enroll(store: Storage) -> None:
    store.add_token(token(1))
    store.add_token(token(2, expires=NOW + dt.timedelta(seconds=1)))
    assert store.spend_token(token(1).token_hash, now=NOW)
    assert not store.spend_token(token(1).token_hash, now=NOW)  # once
    spent = store.get_token(token(1).token_hash)
    assert spent is not None and spent.used_at == NOW and spent.device_id is None
    with pytest.raises(ConflictError, match="token"):
        store.enroll_device(token_hash=token(1).token_hash, device=device(), now=NOW)
    assert not store.spend_token(token(2).token_hash, now=NOW + dt.timedelta(seconds=1))  # expired
    assert not store.spend_token(b"\x09" * 32, now=NOW)  # unknown
    assert store.list_devices() == []


def test_large_serials_and_revocation(store: Storage) -> None:
    big = (1 << 158) + 12345  # X.509 serials are up to 159 bits, beyond any SQL BIGINT
    store.add_token(token(1))
    store.add_token(token(2))
    store.enroll_device(token_hash=token(1).token_hash, device=device("dev-1", big), now=NOW)
    store.enroll_device(token_hash=token(2).token_hash, device=device("dev-2", 2), now=NOW)
    got = store.get_device("dev-1")
    assert got is not None and got.cert_serial == big and not got.revoked
    assert store.revoked_serials() == frozenset()
    revoked = store.revoke_device("dev-1", now=NOW + HOUR)
    assert revoked.revoked and revoked.revoked_at == NOW + HOUR
    again = store.revoke_device("dev-1", now=NOW + 2 * HOUR)
    assert again.revoked_at == NOW + HOUR
    assert store.revoked_serials() == frozenset({big})
    assert [d.device_id for d in store.list_devices(include_revoked=False)] == ["dev-2"]
    with pytest.raises(NotFoundError):
        store.revoke_device("nobody", now=NOW)


def test_naive_times_and_wrong_types_are_refused(store: Storage) -> None:
    with pytest.raises(StorageError, match="timezone"):
        store.create_round(params={}, now=dt.datetime(2026, 1, 1))
    with pytest.raises(StorageError):
        store.create_round(params={"x": object()}, now=NOW)
    with pytest.raises(StorageError):
        store.create_round(params={"x": float("nan")}, now=NOW)
    with pytest.raises(StorageError):
        store.get_round(True)


# -- rounds -------------------------------------------------------------------------------------------------


def test_round_life_cycle(store: Storage) -> None:
    params = {"min_clients": 8, "threshold": 5, "deadlines": {"share_keys": 30.0}, "secagg_plus": True}
    r = store.create_round(params=params, now=NOW, state=b"s0")
    assert (r.status, r.version, r.state, r.participants, r.finished_at) == (
        Stage.CHECK_IN,
        1,
        b"s0",
        (),
        None,
    )
    assert r.params == params
    assert store.active_round() == r
    with pytest.raises(ConflictError, match="active round"):
        store.create_round(params={}, now=NOW)
    other = store.create_round(params={}, now=NOW, cohort="eu")
    assert other.round_id != r.round_id
    r2 = store.update_round(
        r.round_id, expected_version=1, now=NOW + HOUR, status=Stage.ADVERTISE_KEYS, state=b"s1"
    )
    assert (r2.status, r2.version, r2.state, r2.updated_at) == (
        Stage.ADVERTISE_KEYS,
        2,
        b"s1",
        NOW + HOUR,
    )
    with pytest.raises(ConflictError):
        store.update_round(r.round_id, expected_version=1, now=NOW, status=Stage.SHARE_KEYS)
    done = store.update_round(
        r.round_id,
        expected_version=2,
        now=NOW + 2 * HOUR,
        status=Stage.FINISHED,
        participants=["dev-b", "dev-a", "dev-b"],
        model_version=7,
    )
    assert done.finished_at == NOW + 2 * HOUR and done.participants == ("dev-a", "dev-b")
    assert done.model_version == 7 and done.state == b"s1"
    with pytest.raises(ConflictError):
        store.update_round(r.round_id, expected_version=3, now=NOW, status=Stage.ABORTED)
    assert store.active_round() is None
    nxt = store.create_round(params={}, now=NOW + 3 * HOUR)
    assert nxt.round_id > other.round_id > r.round_id
    assert [x.round_id for x in store.list_rounds()] == [nxt.round_id, other.round_id, r.round_id]
    assert [x.round_id for x in store.list_rounds(cohort="eu")] == [other.round_id]
    assert store.get_round(r.round_id) == done
    assert store.get_round(10_000) is None
    with pytest.raises(NotFoundError):
        store.update_round(10_000, expected_version=1, now=NOW)


def test_round_messages_first_write_wins(store: Storage) -> None:
    r = store.create_round(params={}, now=NOW)
    stage = Stage.MASKED_INPUT
    payload = os.urandom(200_000)
    assert store.put_round_message(r.round_id, stage=stage, device_id="dev-1", payload=payload, now=NOW)
    assert not store.put_round_message(r.round_id, stage=stage, device_id="dev-1", payload=payload, now=NOW)
    with pytest.raises(ConflictError):
        store.put_round_message(r.round_id, stage=stage, device_id="dev-1", payload=b"other", now=NOW)
    store.put_round_message(r.round_id, stage=stage, device_id="dev-0", payload=b"x", now=NOW)
    store.put_round_message(r.round_id, stage=Stage.UNMASK, device_id="dev-0", payload=b"y", now=NOW)
    assert store.round_messages(r.round_id, stage=stage) == {"dev-0": b"x", "dev-1": payload}
    assert store.round_messages(r.round_id, stage=Stage.SHARE_KEYS) == {}
    assert store.round_message_senders(r.round_id, stage=stage) == {"dev-0", "dev-1"}
    assert store.round_message_senders(r.round_id, stage=Stage.SHARE_KEYS) == frozenset()
    assert store.round_messages(r.round_id, stage=stage, device_ids=["dev-1", "dev-9"]) == {"dev-1": payload}
    assert store.round_messages(r.round_id, stage=stage, device_ids=[]) == {}
    many = [f"dev-{i}" for i in range(1200)]  # more than one IN (...) batch
    assert store.round_messages(r.round_id, stage=stage, device_ids=many) == {"dev-0": b"x", "dev-1": payload}
    with pytest.raises(StorageError):
        store.round_messages(r.round_id, stage=stage, device_ids="dev-1")
    with pytest.raises(NotFoundError):
        store.put_round_message(999, stage=stage, device_id="dev-1", payload=b"x", now=NOW)
    with pytest.raises(StorageError):
        store.put_round_message(r.round_id, stage=Stage.FINISHED, device_id="d", payload=b"x", now=NOW)
    store.update_round(r.round_id, expected_version=1, now=NOW, status=Stage.ABORTED)
    with pytest.raises(ConflictError, match="finished"):
        store.put_round_message(r.round_id, stage=stage, device_id="dev-2", payload=b"late", now=NOW)


# -- idempotency --------------------------------------------------------------------------------------------


def test_idempotent_responses(store: Storage) -> None:
    first = store.record_response(
        scope="dev-1/Share", request_id="r1", request_digest=b"d", response=b"A", now=NOW
    )
    again = store.record_response(
        scope="dev-1/Share", request_id="r1", request_digest=b"d", response=b"B", now=NOW + HOUR
    )
    assert again == first and again.response == b"A" and again.created_at == NOW
    with pytest.raises(ConflictError, match="different request"):
        store.record_response(
            scope="dev-1/Share", request_id="r1", request_digest=b"e", response=b"C", now=NOW
        )
    other = store.record_response(
        scope="dev-2/Share", request_id="r1", request_digest=b"e", response=b"C", now=NOW
    )
    assert other.response == b"C"
    assert store.get_response(scope="dev-1/Share", request_id="r1") == first
    assert store.get_response(scope="dev-1/Share", request_id="r2") is None
    store.record_response(
        scope="s", request_id="late", request_digest=b"d", response=b"L", now=NOW + 2 * HOUR
    )
    assert store.delete_responses_before(before=NOW + HOUR) == 2
    assert store.get_response(scope="s", request_id="late") is not None


# -- models -------------------------------------------------------------------------------------------------


def test_model_versions(store: Storage) -> None:
    assert store.latest_model_version() is None
    m1 = model(1, None, "aa", b"\x00" * 10, origin="shipped:vfer-6@f6751dd9e339")
    m2 = model(2, 1, "bb", b"\x01" * 10, origin="round:1")
    assert store.put_model(m2) and store.put_model(m1)
    assert not store.put_model(m1)
    with pytest.raises(ConflictError):
        store.put_model(model(1, None, "cc"))
    assert store.get_model(1) == m1 and store.get_model(3) is None
    assert store.latest_model_version() == 2
    assert store.list_model_versions() == [1, 2]
    with pytest.raises(StorageError):
        store.put_model(model(0, None, ""))


def test_publish_round_stores_the_model_and_finishes_the_round_in_one_transaction(store: Storage) -> None:
    m1 = model(1, None, "aa", b"\x00" * 10, origin="shipped:vfer-6@f6751dd9e339")
    m2 = model(2, 1, "bb", b"\x01" * 10, origin="round:1")
    store.put_model(m1)
    r = store.create_round(params={}, now=NOW)
    r = store.update_round(r.round_id, expected_version=1, now=NOW, status=Stage.UNMASK)
    # A stale version (another coordinator moved the round on): refused, and the model is not stored either.
    with pytest.raises(ConflictError):
        store.publish_round(r.round_id, expected_version=1, now=NOW, model=m2, participants=["dev-a"])
    assert store.list_model_versions() == [1]
    assert store.get_round(r.round_id) == r
    # The model version exists already (published by someone else): refused, the round stays as it was.
    with pytest.raises(ConflictError):
        store.publish_round(r.round_id, expected_version=2, now=NOW, model=m1, participants=["dev-a"])
    assert store.get_round(r.round_id) == r and store.get_model(1) == m1
    done = store.publish_round(
        r.round_id, expected_version=2, now=NOW + HOUR, model=m2, participants=["dev-b", "dev-a"]
    )
    assert (done.status, done.model_version, done.participants, done.finished_at, done.version) == (
        Stage.FINISHED,
        2,
        ("dev-a", "dev-b"),
        NOW + HOUR,
        3,
    )
    assert store.get_model(2) == m2 and store.active_round() is None
    # A finished round cannot publish again, whatever the version.
    m3 = model(3, 2, "cc")
    with pytest.raises(ConflictError):
        store.publish_round(r.round_id, expected_version=3, now=NOW, model=m3, participants=[])
    assert store.list_model_versions() == [1, 2]
    with pytest.raises(NotFoundError):
        store.publish_round(10_000, expected_version=1, now=NOW, model=m3, participants=[])
    assert store.list_model_versions() == [1, 2]


def test_model_origins_are_stored_listed_and_checked(store: Storage) -> None:
    m1 = model(1, None, "aa", b"\x00" * 10, origin="shipped:vfer-6@f6751dd9e339")
    m2 = model(2, 1, "bb", b"\x01" * 10, origin="import:v0.npz@0123456789ab")
    assert store.put_model(m1) and store.put_model(m2)
    r = store.create_round(params={}, now=NOW)
    m3 = model(3, 2, "cc", b"\x02" * 4, origin=f"round:{r.round_id}")
    store.publish_round(r.round_id, expected_version=1, now=NOW, model=m3, participants=["dev-a"])
    assert [store.get_model(v) for v in (1, 2, 3)] == [m1, m2, m3]
    assert store.list_models() == [
        ModelInfo(version=m.version, parent=m.parent, manifest=m.manifest, digest=m.digest, created_at=NOW,
                  origin=m.origin)
        for m in (m1, m2, m3)
    ]  # fmt: skip
    # The first write wins: a retry of the same version keeps the stored origin.
    assert not store.put_model(model(1, None, "aa", b"\x00" * 10, origin="random:seed=0"))
    assert store.get_model(1) == m1
    for bad in ("", "x" * 257, None, b"round:1"):
        with pytest.raises(StorageError, match="origin"):
            store.put_model(model(4, 3, "dd", origin=bad))  # type: ignore[arg-type]
    assert store.list_model_versions() == [1, 2, 3]


def _schema_2_database(url: str) -> None:
    """An aggregator database as schema version 2 left it (no model origins): three model versions, a
    published round that names version 2 and an aborted one that names version 3."""
    dialect = SqliteStorage if url.startswith("sqlite:") else PostgresStorage
    schema = [
        st.format(blob=dialect._blob_type, autoid=dialect._autoid_type) for m in _MIGRATIONS[:2] for st in m
    ]
    rows: list[tuple[str, tuple[object, ...]]] = [
        ("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied_at BIGINT)", ()),
        *((st, ()) for st in schema),
        ("INSERT INTO schema_migrations (version, applied_at) VALUES (1, 0), (2, 0)", ()),
        *(
            ("INSERT INTO models (version, parent, manifest, digest, blob, created_at) "
             "VALUES (?, ?, '[]', ?, ?, 0)", (v, parent, f"{v:02x}", b"\x00"))
            for v, parent in ((1, None), (2, 1), (3, 2))
        ),
        *(
            ("INSERT INTO rounds (cohort, status, params, created_at, updated_at, model_version, state, "
             "participants, version) VALUES ('default', ?, '{}', 0, 0, ?, ?, '[]', 3)",
             (status, version, b""))
            for status, version in (("published", 2), ("aborted", 3))
        ),
    ]  # fmt: skip
    if dialect is SqliteStorage:
        import sqlite3

        with contextlib.closing(sqlite3.connect(url.removeprefix("sqlite://"))) as conn:
            for sql, params in rows:
                conn.execute(sql, params)
            conn.commit()
    else:
        with psycopg.connect(url, autocommit=True) as pg:
            for sql, params in rows:
                pg.execute(sql.replace("?", "%s").encode(), params)


def test_a_schema_2_database_is_migrated_to_recorded_origins(storage_url: str) -> None:
    _schema_2_database(storage_url)
    with open_storage(storage_url, now=NOW) as s:  # an existing deployment: no create
        assert s.schema_version() == SCHEMA_VERSION
        published = [r.round_id for r in s.list_rounds() if r.status is Stage.FINISHED]
        # What a published round names is that round's output; the rest was imported by hand, file unknown.
        assert [(m.version, m.origin) for m in s.list_models()] == [
            (1, "unrecorded"), (2, f"round:{published[0]}"), (3, "unrecorded"),
        ]  # fmt: skip
        second = s.get_model(2)
        assert second is not None and second.origin == f"round:{published[0]}"
        s.put_model(model(4, 3, "dd", origin="import:v4.npz@0123456789ab"))
    with open_storage(storage_url, now=NOW) as s:  # migrated once: reopening changes nothing
        assert [m.origin for m in s.list_models()] == [
            "unrecorded", f"round:{published[0]}", "unrecorded", "import:v4.npz@0123456789ab",
        ]  # fmt: skip
        assert s.schema_version() == SCHEMA_VERSION


def test_a_damaged_origin_reads_as_storage_corrupt_error(tmp_path: Path) -> None:
    url = f"sqlite://{tmp_path / 'agg.db'}"
    with open_storage(url, now=NOW, create=True) as s:
        s.put_model(model(1, None, "aa"))
        import sqlite3

        with contextlib.closing(sqlite3.connect(url.removeprefix("sqlite://"))) as raw:
            raw.execute("UPDATE models SET origin = x'ff'")  # not text
            raw.commit()
        with pytest.raises(StorageCorruptError, match="model record is damaged"):
            s.get_model(1)
        with pytest.raises(StorageCorruptError, match="model record is damaged"):
            s.list_models()


# -- leases -------------------------------------------------------------------------------------------------


def test_lease_is_held_renewed_taken_over_after_expiry_and_released(store: Storage) -> None:
    ttl = dt.timedelta(seconds=10)
    second = dt.timedelta(seconds=1)
    assert store.get_lease("coordinator/default") is None
    a = store.acquire_lease("coordinator/default", owner="replica-a", now=NOW, ttl=ttl)
    assert a == LeaseRecord("coordinator/default", "replica-a", NOW, NOW + ttl)
    # While A's lease runs, B does not get it, not even a second before it ends.
    held = store.acquire_lease("coordinator/default", owner="replica-b", now=NOW + 9 * second, ttl=ttl)
    assert held == a
    # A renews: the expiry moves, the acquisition time stays.
    renewed = store.acquire_lease("coordinator/default", owner="replica-a", now=NOW + 5 * second, ttl=ttl)
    assert (renewed.owner, renewed.acquired_at, renewed.expires_at) == ("replica-a", NOW, NOW + 15 * second)
    # Leases of other names are independent.
    eu = store.acquire_lease("coordinator/eu", owner="replica-b", now=NOW, ttl=ttl)
    assert eu.owner == "replica-b"
    # Once A's lease expired, B takes it over, and A's late renewal does not take it back.
    later = NOW + 15 * second
    taken = store.acquire_lease("coordinator/default", owner="replica-b", now=later, ttl=ttl)
    assert taken == LeaseRecord("coordinator/default", "replica-b", later, later + ttl)
    assert store.acquire_lease("coordinator/default", owner="replica-a", now=later, ttl=ttl) == taken
    # Only the holder can release it; then anyone can take it at once.
    assert not store.release_lease("coordinator/default", owner="replica-a")
    assert store.get_lease("coordinator/default") == taken
    assert store.release_lease("coordinator/default", owner="replica-b")
    assert store.get_lease("coordinator/default") is None
    again = store.acquire_lease("coordinator/default", owner="replica-a", now=later, ttl=ttl)
    assert again.owner == "replica-a"
    for bad_ttl in (dt.timedelta(0), 10):
        with pytest.raises(StorageError):
            store.acquire_lease("x", owner="replica-a", now=NOW, ttl=bad_ttl)  # type: ignore[arg-type]
    with pytest.raises(StorageError):
        store.acquire_lease("", owner="replica-a", now=NOW, ttl=ttl)
    with pytest.raises(StorageError):
        store.acquire_lease("x", owner="replica-a", now=NOW.replace(tzinfo=None), ttl=ttl)


# -- races between connections -----------------------------------------------------------------------------


RACERS = 6


def test_racing_token_claims_have_one_winner(storage_url: str) -> None:
    stores = [open_storage(storage_url, now=NOW, create=True) for _ in range(RACERS)]
    try:
        stores[0].add_token(token())
        results = race(
            RACERS,
            lambda i: stores[i].enroll_device(
                token_hash=token().token_hash, device=device(f"dev-{i}", i + 1), now=NOW
            ),
        )
        winners = [r for r in results if isinstance(r, DeviceRecord)]
        assert len(winners) == 1, results
        assert all(isinstance(r, ConflictError) for r in results if not isinstance(r, DeviceRecord))
        assert [d.device_id for d in stores[0].list_devices()] == [winners[0].device_id]
    finally:
        for s in stores:
            s.close()


def test_racing_request_ids_get_one_response(storage_url: str) -> None:
    stores = [open_storage(storage_url, now=NOW, create=True) for _ in range(RACERS)]
    try:
        results = race(
            RACERS,
            lambda i: stores[i].record_response(
                scope="dev-1",
                request_id="req-9",
                request_digest=b"same",
                response=f"answer {i}".encode(),
                now=NOW,
            ),
        )
        responses = {r.response for r in results if not isinstance(r, BaseException)}
        assert len(responses) == 1 and not any(isinstance(r, BaseException) for r in results), results
        stored = stores[0].get_response(scope="dev-1", request_id="req-9")
        assert stored is not None and {stored.response} == responses
    finally:
        for s in stores:
            s.close()


def test_racing_lease_acquisitions_have_one_holder(storage_url: str) -> None:
    stores = [open_storage(storage_url, now=NOW, create=True) for _ in range(RACERS)]
    ttl = dt.timedelta(seconds=10)
    try:
        for attempt, now in enumerate((NOW, NOW + 2 * ttl)):  # a free lease, then an expired one
            results = race(
                RACERS,
                lambda i, now=now, attempt=attempt: stores[i].acquire_lease(
                    "coordinator/default", owner=f"replica-{attempt}-{i}", now=now, ttl=ttl
                ),
            )
            assert not any(isinstance(r, BaseException) for r in results), results
            owners = {r.owner for r in results if isinstance(r, LeaseRecord)}
            winners = [
                i
                for i, r in enumerate(results)
                if isinstance(r, LeaseRecord) and r.owner == f"replica-{attempt}-{i}"
            ]
            assert len(owners) == 1 and len(winners) == 1, (attempt, results)
            stored = stores[0].get_lease("coordinator/default")
            assert stored == LeaseRecord(
                "coordinator/default", f"replica-{attempt}-{winners[0]}", now, now + ttl
            )
    finally:
        for s in stores:
            s.close()


def test_racing_round_creation_and_updates(storage_url: str) -> None:
    stores = [open_storage(storage_url, now=NOW, create=True) for _ in range(RACERS)]
    try:
        created = race(RACERS, lambda i: stores[i].create_round(params={"by": i}, now=NOW))
        rounds = [r for r in created if not isinstance(r, BaseException)]
        assert len(rounds) == 1 and sum(isinstance(r, ConflictError) for r in created) == RACERS - 1
        rid = rounds[0].round_id
        moved = race(
            RACERS,
            lambda i: stores[i].update_round(
                rid, expected_version=1, now=NOW, status=Stage.ADVERTISE_KEYS, state=bytes([i])
            ),
        )
        ok = [r for r in moved if not isinstance(r, BaseException)]
        assert len(ok) == 1 and sum(isinstance(r, ConflictError) for r in moved) == RACERS - 1
        final = stores[0].get_round(rid)
        assert final is not None and final.version == 2 and final.state == ok[0].state
    finally:
        for s in stores:
            s.close()


# -- durability across a killed process ---------------------------------------------------------------------

_WRITER = """
import datetime as dt, sys
from fedfer.aggregator.storage import open_storage, TokenRecord, DeviceRecord
from fedfer.security.secagg import Stage
now = dt.datetime(2026, 11, 22, tzinfo=dt.UTC)
s = open_storage(sys.argv[1], now=now)
for i in range(1, 100000):
    h = i.to_bytes(32, "big")
    s.add_token(TokenRecord(token_hash=h, created_at=now, expires_at=now + dt.timedelta(days=1)))
    s.enroll_device(token_hash=h, now=now, device=DeviceRecord(
        device_id=f"dev-{i}", cert_fingerprint=f"{i:064x}", cert_serial=i,
        identity_public_key=bytes(32), created_at=now))
    r = s.create_round(params={"i": i}, now=now)
    s.update_round(r.round_id, expected_version=1, now=now, status=Stage.FINISHED)
    print(i, flush=True)
"""


def test_committed_data_survives_sigkill(storage_url: str) -> None:
    with open_storage(storage_url, now=NOW, create=True):
        pass  # migrate first, so the child only writes
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen(
        [sys.executable, "-c", _WRITER, storage_url], stdout=subprocess.PIPE, text=True, env=env
    )
    assert child.stdout is not None
    acknowledged = 0
    try:
        for line in child.stdout:
            acknowledged = int(line)
            if acknowledged >= 15:
                break
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    assert child.returncode == -signal.SIGKILL
    assert acknowledged >= 15
    with open_storage(storage_url, now=NOW) as s:
        devices = s.list_devices()
        # Every acknowledged write survived (the child may have gone on a little before the kill landed);
        # each transaction in flight either fully happened or not at all.
        assert len(devices) >= acknowledged
        rounds = s.list_rounds(limit=1000)
        assert len(rounds) in (len(devices) - 1, len(devices))
        assert all(t.status is Stage.FINISHED for t in rounds[1:])
        for i in range(1, acknowledged + 1):
            tok = s.get_token(i.to_bytes(32, "big"))
            assert tok is not None and tok.device_id == f"dev-{i}"
        # The store keeps working after the crash.
        active = s.active_round()
        if active is not None:
            s.update_round(active.round_id, expected_version=active.version, now=NOW, status=Stage.ABORTED)
        assert s.create_round(params={}, now=NOW).status is Stage.CHECK_IN


def test_postgres_reconnects_after_the_server_drops_the_connection(postgres_server: PostgresServer) -> None:
    url = postgres_server.new_database()
    with open_storage(url, now=NOW, create=True) as s:
        s.add_token(token())
        dbname = url.rsplit("/", 1)[1]
        with psycopg.connect(postgres_server.admin_url, autocommit=True) as admin:
            killed = admin.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = %s", (dbname,)
            ).fetchone()
        assert killed is not None and killed[0] == 1
        # The next call notices the dead connection before doing anything and reconnects.
        assert s.get_token(token().token_hash) == token()
        s.add_token(token(2))
        assert s.get_token(token(2).token_hash) is not None


_CONTENDER = """
import datetime as dt, sys
from fedfer.aggregator.storage import open_storage, ConflictError
from fedfer.security.secagg import Stage
now = dt.datetime(2026, 11, 22, tzinfo=dt.UTC)
worker = int(sys.argv[2])
s = open_storage(sys.argv[1], now=now)
opened = 0
for i in range(25):
    answer = b"%d" % worker
    s.record_response(scope="shared", request_id=f"r{i}", request_digest=b"d", response=answer, now=now)
    try:
        r = s.create_round(params={"w": worker}, now=now)
    except ConflictError:
        continue
    opened += 1
    s.update_round(r.round_id, expected_version=1, now=now, status=Stage.ABORTED)
print(opened)
"""


def test_sqlite_is_safe_for_several_processes(tmp_path: Path) -> None:
    url = f"sqlite://{tmp_path / 'shared.db'}"
    with open_storage(url, now=NOW, create=True):
        pass
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CONTENDER, url, str(w)], stdout=subprocess.PIPE, text=True, env=env
        )
        for w in range(3)
    ]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0]
    opened = sum(int(o) for o in outputs)
    with open_storage(url, now=NOW) as s:
        rounds = s.list_rounds(limit=1000)
        assert len(rounds) == opened and all(r.status is Stage.ABORTED for r in rounds)
        answers = {s.get_response(scope="shared", request_id=f"r{i}") for i in range(25)}
        assert None not in answers and len(answers) == 25


def test_concurrent_first_opens_migrate_once(storage_url: str) -> None:
    opened = race(RACERS, lambda i: open_storage(storage_url, now=NOW, create=True))
    try:
        assert all(isinstance(s, Storage) for s in opened), opened
        assert {s.schema_version() for s in opened if isinstance(s, Storage)} == {SCHEMA_VERSION}
    finally:
        for s in opened:
            if isinstance(s, Storage):
                s.close()


def test_a_newer_schema_is_refused(storage_url: str) -> None:
    with open_storage(storage_url, now=NOW, create=True):
        pass
    sql = "INSERT INTO schema_migrations (version, applied_at) VALUES (99, 0)"
    if storage_url.startswith("sqlite:"):
        import sqlite3

        conn = sqlite3.connect(storage_url.removeprefix("sqlite://"))
        conn.execute(sql)
        conn.commit()
        conn.close()
    else:
        with psycopg.connect(storage_url, autocommit=True) as pg:
            pg.execute(sql)
    with pytest.raises(StorageError, match="newer"):
        open_storage(storage_url, now=NOW)
