"""The encrypted feature cache: round trip, integrity (tamper, cut, swap, move, replay, seal state), keys.

Whole-index rollbacks are in test_cache_rollback.py.
"""

from __future__ import annotations

import os
import sqlite3
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedfer.agent.records import FrameRecord
from fedfer.agent.store.cache import (
    DB_NAME,
    KEY_FILE_NAME,
    CacheError,
    FeatureCache,
    RecordIntegrityError,
    SessionNotFoundError,
    SessionSealedError,
    decode_frame,
    encode_frame,
)
from fedfer.agent.store.keys import (
    FileKeyStore,
    InsecureKeyFileError,
    KeyringKeyStore,
    KeyStoreError,
    default_key_store,
)
from fedfer.security.envelope import KeyEncryptionKey
from fedfer.security.errors import IntegrityError, ValidationError


def make_records(n: int, *, seed: int = 0, classes: int = 7, t0: float = 0.0) -> list[FrameRecord]:
    """Realistic frames: sparse non-negative MobileNetV2-like features, softmax probabilities, boxes."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        feature = np.clip(rng.gamma(0.7, 0.9, size=1280), 0, 6) * (rng.random(1280) > 0.15)
        probs = rng.dirichlet(np.ones(classes)).astype(np.float32)
        box = (float(rng.integers(100, 200)), float(rng.integers(40, 90)), 180.0, 200.0)
        out.append(
            FrameRecord(
                timestamp=t0 + i / 29.97,
                feature=feature.astype(np.float16),
                ifer_probs=probs,
                box=box,
                score=float(rng.uniform(0.8, 1.0)),
            )
        )
    return out


def same(a: FrameRecord, b: FrameRecord) -> bool:
    """Field-by-field equality of two records (float16 features compared bit for bit)."""
    return (
        a.timestamp == b.timestamp
        and np.array_equal(a.feature.view(np.uint16), b.feature.view(np.uint16))
        and np.array_equal(a.ifer_probs, b.ifer_probs)
        and a.box == b.box
        and abs(a.score - b.score) < 1e-6
    )


def raw_db(cache: FeatureCache) -> sqlite3.Connection:
    """A second, independent connection: the attacker's (or a disk editor's) view of the index."""
    conn = sqlite3.connect(cache.database_path, isolation_level=None)
    conn.execute("PRAGMA busy_timeout = 5000")
    return conn


def sid_of(conn: sqlite3.Connection, session_id: str) -> int:
    (sid,) = conn.execute("SELECT sid FROM sessions WHERE public_id = ?", (session_id,)).fetchone()
    return int(sid)


def blob_at(conn: sqlite3.Connection, session_id: str, seq: int) -> bytes:
    (blob,) = conn.execute(
        "SELECT blob FROM records WHERE sid = ? AND seq = ?", (sid_of(conn, session_id), seq)
    ).fetchone()
    return bytes(blob)


def set_blob(conn: sqlite3.Connection, session_id: str, seq: int, blob: bytes) -> None:
    conn.execute(
        "UPDATE records SET blob = ? WHERE sid = ? AND seq = ?", (blob, sid_of(conn, session_id), seq)
    )


@pytest.fixture
def cache(tmp_path: Path) -> Iterator[FeatureCache]:
    c = FeatureCache(tmp_path / "cache")
    yield c
    c.close()


def test_round_trip_batches_singles_and_metadata(cache: FeatureCache) -> None:
    records = make_records(40)
    sid = cache.begin_session()
    assert cache.append_batch(sid, records[:30]) == list(range(30))
    for i, r in enumerate(records[30:], start=30):
        assert cache.append(sid, r) == i
    out = cache.read_session(sid)
    assert len(out) == 40 and all(same(a, b) for a, b in zip(out, records, strict=True))
    assert same(cache.read_record(sid, 17), records[17])
    info = cache.session_info(sid)
    assert (info.session_id, info.frames, info.sealed) == (sid, 40, False)
    assert info.bytes == cache.total_bytes() > 40 * 2600
    cache.end_session(sid)
    cache.end_session(sid)  # idempotent
    assert cache.session_info(sid).sealed
    contents = cache.recover_session(sid)
    assert contents.complete and not contents.failed and len(contents.records) == 40
    with pytest.raises(SessionSealedError):
        cache.append(sid, records[0])
    # Reopening with the same key file reads the same data.
    directory = cache.directory
    cache.close()
    with FeatureCache(directory) as again:
        assert [s.session_id for s in again.sessions()] == [sid]
        assert all(same(a, b) for a, b in zip(again.read_session(sid), records, strict=True))


def test_several_sessions_are_independent_and_ordered(cache: FeatureCache) -> None:
    ids = [cache.begin_session(created=1000.0 + i) for i in range(3)]
    for i, sid in enumerate(ids):
        cache.append_batch(sid, make_records(5 + i, seed=i))
    assert [s.session_id for s in cache.sessions()] == ids
    assert [s.frames for s in cache.sessions()] == [5, 6, 7]
    assert [(info.session_id, len(frames)) for info, frames in cache.iter_sessions()] == [
        (ids[0], 5),
        (ids[1], 6),
        (ids[2], 7),
    ]


def test_frame_codec_is_compact_and_exact() -> None:
    r = make_records(1, classes=6)[0]
    data = encode_frame(r)
    assert len(data) == 30 + 2560 + 4 * 6
    assert same(decode_frame(data), r)
    with pytest.raises(ValidationError):
        decode_frame(data[:-1])
    with pytest.raises(ValidationError):
        encode_frame("not a record")  # type: ignore[arg-type]


def test_bytes_per_frame_on_disk(tmp_path: Path) -> None:
    with FeatureCache(tmp_path / "c") as c:
        sid = c.begin_session()
        for start in range(0, 600, 60):
            c.append_batch(sid, make_records(60, seed=start))
        c.end_session(sid)
        c.rotate_kek()  # checkpoints the WAL into the database file
        size = sum(p.stat().st_size for p in (tmp_path / "c").glob(DB_NAME + "*"))
        per_frame = size / 600
        record_bytes = c.session_info(sid).bytes / 600
    # 2,590 + 4*7 plaintext bytes + 29 bytes of nonce, tag and version; the file adds B-tree overhead.
    assert 2600 < record_bytes < 2700
    assert per_frame < 3000, per_frame


def test_bad_arguments_are_clear_errors(cache: FeatureCache) -> None:
    sid = cache.begin_session()
    with pytest.raises(ValidationError):
        cache.append("../../etc/passwd", make_records(1)[0])
    with pytest.raises(ValidationError):
        cache.append_batch(sid, [make_records(1)[0], "frame"])  # type: ignore[list-item]
    assert cache.session_info(sid).frames == 0  # a bad batch stores nothing
    with pytest.raises(SessionNotFoundError):
        cache.read_session("0" * 32)
    with pytest.raises(SessionNotFoundError):
        cache.append("f" * 32, make_records(1)[0])
    with pytest.raises(ValidationError):
        cache.read_record(sid, 0)  # out of range
    with pytest.raises(ValidationError):
        FeatureCache(cache.directory, max_bytes=0)
    with pytest.raises(ValidationError):
        FeatureCache(cache.directory, max_age_s=-1.0)


# -- integrity -------------------------------------------------------------------------------------------


def test_tampered_and_truncated_records_fail_alone(cache: FeatureCache) -> None:
    sid = cache.begin_session()
    records = make_records(10)
    cache.append_batch(sid, records)
    db = raw_db(cache)
    blob = bytearray(blob_at(db, sid, 3))
    blob[100] ^= 0x40
    set_blob(db, sid, 3, bytes(blob))
    set_blob(db, sid, 6, blob_at(db, sid, 6)[:-7])
    with pytest.raises(RecordIntegrityError) as info:
        cache.read_session(sid)
    assert info.value.position == 3 and info.value.session_id == sid
    with pytest.raises(RecordIntegrityError):
        cache.read_record(sid, 6)
    contents = cache.recover_session(sid)
    assert contents.failed == (3, 6)
    assert [p for p, _ in contents.records] == [0, 1, 2, 4, 5, 7, 8, 9]
    assert all(same(r, records[p]) for p, r in contents.records)
    assert same(cache.read_record(sid, 7), records[7])


def test_swapped_records_are_detected(cache: FeatureCache) -> None:
    sid = cache.begin_session()
    cache.append_batch(sid, make_records(6))
    db = raw_db(cache)
    a, b = blob_at(db, sid, 2), blob_at(db, sid, 4)
    set_blob(db, sid, 2, b)
    set_blob(db, sid, 4, a)
    assert cache.recover_session(sid).failed == (2, 4)
    # Reordering by renumbering rows is the same attack seen from the other side.
    db.execute("UPDATE records SET seq = 99 WHERE sid = ? AND seq = 0", (sid_of(db, sid),))
    db.execute("UPDATE records SET seq = 0 WHERE sid = ? AND seq = 1", (sid_of(db, sid),))
    db.execute("UPDATE records SET seq = 1 WHERE sid = ? AND seq = 99", (sid_of(db, sid),))
    assert cache.recover_session(sid).failed == (0, 1, 2, 4)


def test_record_moved_between_sessions_or_caches_is_detected(tmp_path: Path) -> None:
    with FeatureCache(tmp_path / "a") as a, FeatureCache(tmp_path / "b") as b:
        s1, s2 = a.begin_session(), a.begin_session()
        a.append_batch(s1, make_records(4, seed=1))
        a.append_batch(s2, make_records(4, seed=2))
        t1 = b.begin_session()
        b.append_batch(t1, make_records(4, seed=3))
        db_a, db_b = raw_db(a), raw_db(b)
        set_blob(db_a, s2, 1, blob_at(db_a, s1, 1))  # same position, other session
        set_blob(db_b, t1, 2, blob_at(db_a, s1, 2))  # same position, other cache
        assert a.recover_session(s2).failed == (1,)
        assert a.recover_session(s1).failed == ()
        assert b.recover_session(t1).failed == (2,)


def test_replay_of_a_valid_ciphertext_at_another_position_is_detected(cache: FeatureCache) -> None:
    sid = cache.begin_session()
    cache.append_batch(sid, make_records(8))
    db = raw_db(cache)
    old = blob_at(db, sid, 1)  # a valid ciphertext of this very session, older position
    set_blob(db, sid, 7, old)
    with pytest.raises(RecordIntegrityError) as info:
        cache.read_record(sid, 7)
    assert info.value.position == 7
    # Replacing a session's wrapped data key with another session's (or an older one) fails too.
    other = cache.begin_session()
    cache.append_batch(other, make_records(2))
    (wrapped,) = db.execute("SELECT wrapped_dek FROM sessions WHERE public_id = ?", (other,)).fetchone()
    db.execute("UPDATE sessions SET wrapped_dek = ? WHERE public_id = ?", (wrapped, sid))
    with FeatureCache(cache.directory) as fresh:  # no data key cached in memory
        with pytest.raises(IntegrityError):
            fresh.read_session(sid)
        assert len(fresh.read_session(other)) == 2


def test_a_corrupt_data_key_does_not_block_forgetting_others(cache: FeatureCache) -> None:
    broken, doomed, kept = (cache.begin_session() for _ in range(3))
    for sid in (broken, doomed, kept):
        cache.append_batch(sid, make_records(2))
    db = raw_db(cache)
    db.execute("UPDATE sessions SET wrapped_dek = zeroblob(61) WHERE public_id = ?", (broken,))
    with FeatureCache(cache.directory) as fresh:
        fresh.forget(doomed)  # rotates the KEK: the broken session is skipped, not fatal
        with pytest.raises(IntegrityError):
            fresh.read_session(broken)
        assert len(fresh.read_session(kept)) == 2
        fresh.forget(broken)
        assert [s.session_id for s in fresh.sessions()] == [kept]


def test_missing_records_and_cut_seal_are_detected(cache: FeatureCache) -> None:
    sid = cache.begin_session()
    cache.append_batch(sid, make_records(6))
    cache.end_session(sid)
    db = raw_db(cache)
    db.execute("DELETE FROM records WHERE sid = ? AND seq = 2", (sid_of(db, sid),))
    assert cache.recover_session(sid).failed == (2,)
    # Cutting the tail of a sealed session: the authenticated seal still says six frames.
    db.execute("DELETE FROM records WHERE sid = ? AND seq = 5", (sid_of(db, sid),))
    db.execute("UPDATE sessions SET frames = 5 WHERE sid = ?", (sid_of(db, sid),))
    contents = cache.recover_session(sid)
    assert contents.failed == (2, 5) and not contents.complete
    # Deleting the seal itself while the index still says sealed.
    db.execute("DELETE FROM records WHERE sid = ? AND seq = 6", (sid_of(db, sid),))
    assert 5 in cache.recover_session(sid).failed
    # Relabelling a frame as a seal (the kind is bound into the associated data).
    s2 = cache.begin_session()
    cache.append_batch(s2, make_records(3))
    db.execute("UPDATE records SET kind = 2 WHERE sid = ? AND seq = 2", (sid_of(db, s2),))
    assert cache.recover_session(s2).failed == (2,)


def test_truncating_a_sealed_session_and_unsealing_its_index_entry_is_detected(cache: FeatureCache) -> None:
    # The reproduced attack: seal a 6-frame session, delete records 3+ and the seal, then make the index
    # say "open, 3 frames". The data key was re-wrapped as sealed, so the index cannot take that back.
    records = make_records(6)
    sid = cache.begin_session()
    cache.append_batch(sid, records)
    cache.end_session(sid)
    db = raw_db(cache)
    db.execute("DELETE FROM records WHERE sid = ? AND seq >= 3", (sid_of(db, sid),))
    db.execute("UPDATE sessions SET sealed = 0, frames = 3 WHERE sid = ?", (sid_of(db, sid),))
    fresh = FeatureCache(cache.directory)
    for reader in (cache, fresh):  # with the data key cached in memory, and without
        with pytest.raises(RecordIntegrityError) as info:
            reader.read_session(sid)
        assert info.value.position == 3
        contents = reader.recover_session(sid)
        assert contents.failed == (3,) and not contents.complete
        assert [p for p, _ in contents.records] == [0, 1, 2]  # what is left stays readable
        assert all(same(r, records[p]) for p, r in contents.records)
        # Nothing can be appended to (or re-sealed into) the cut session.
        with pytest.raises(IntegrityError, match="does not match its data key"):
            reader.append(sid, records[3])
        with pytest.raises(IntegrityError, match="does not match its data key"):
            reader.end_session(sid)
        assert len(reader.recover_session(sid).records) == 3
    fresh.close()
    # The same cut with the index still saying "sealed": the missing seal is reported.
    db.execute("UPDATE sessions SET sealed = 1 WHERE sid = ?", (sid_of(db, sid),))
    assert cache.recover_session(sid).failed == (3,)


def test_flipping_the_seal_flag_either_way_is_detected(cache: FeatureCache) -> None:
    open_sid, sealed_sid = cache.begin_session(), cache.begin_session()
    cache.append_batch(open_sid, make_records(4))
    cache.append_batch(sealed_sid, make_records(4))
    cache.end_session(sealed_sid)
    db = raw_db(cache)
    # An open session marked sealed (nothing cut): it is reported, at the position a seal would have.
    db.execute("UPDATE sessions SET sealed = 1 WHERE public_id = ?", (open_sid,))
    contents = cache.recover_session(open_sid)
    assert contents.failed == (4,) and len(contents.records) == 4 and not contents.complete
    # A sealed session marked open with everything still there: reported at its (intact) seal.
    db.execute("UPDATE sessions SET sealed = 0 WHERE public_id = ?", (sealed_sid,))
    contents = cache.recover_session(sealed_sid)
    assert contents.failed == (4,) and len(contents.records) == 4 and not contents.complete
    with pytest.raises(RecordIntegrityError):
        cache.read_session(sealed_sid)
    # Putting the flags back makes both sessions whole again: nothing was lost.
    db.execute("UPDATE sessions SET sealed = 0 WHERE public_id = ?", (open_sid,))
    db.execute("UPDATE sessions SET sealed = 1 WHERE public_id = ?", (sealed_sid,))
    assert cache.recover_session(open_sid).failed == ()
    assert cache.recover_session(sealed_sid).complete


def test_pre_seal_wrapped_key_put_back_is_refused(cache: FeatureCache) -> None:
    # The attacker keeps the 61 bytes of the open session's wrapped key, lets it be sealed, then cuts the
    # tail and puts the old key back: sealing rotated the KEK, so the old wrapped key opens under nothing.
    sid = cache.begin_session()
    cache.append_batch(sid, make_records(6))
    db = raw_db(cache)
    (open_key,) = db.execute("SELECT wrapped_dek FROM sessions WHERE public_id = ?", (sid,)).fetchone()
    cache.end_session(sid)
    db.execute("DELETE FROM records WHERE sid = ? AND seq >= 3", (sid_of(db, sid),))
    db.execute(
        "UPDATE sessions SET sealed = 0, frames = 3, wrapped_dek = ? WHERE public_id = ?", (open_key, sid)
    )
    with FeatureCache(cache.directory) as fresh:
        with pytest.raises(IntegrityError, match="data key of session"):
            fresh.read_session(sid)
        with pytest.raises(IntegrityError, match="data key of session"):
            fresh.recover_session(sid)


def test_format_1_index_is_migrated_with_its_sealed_sessions(tmp_path: Path) -> None:
    directory = tmp_path / "c"
    records = make_records(5)
    with FeatureCache(directory) as c:
        sealed, still_open = c.begin_session(), c.begin_session()
        c.append_batch(sealed, records)
        c.append_batch(still_open, records[:2])
        c.end_session(sealed)
    # Rewrite the index as format 1 wrote it: every data key bound to the session id alone.
    (kek,) = FileKeyStore(directory / KEY_FILE_NAME).load()
    db = sqlite3.connect(directory / DB_NAME, isolation_level=None)
    (cache_id,) = db.execute("SELECT value FROM meta WHERE name = 'cache_id'").fetchone()
    (wrapped,) = db.execute("SELECT wrapped_dek FROM sessions WHERE public_id = ?", (sealed,)).fetchone()
    dek = kek.unwrap_data_key(wrapped, cache_id=cache_id, session_id=(sealed + "/sealed").encode())
    legacy = kek.wrap_data_key(dek, cache_id=cache_id, session_id=sealed.encode())
    db.execute("UPDATE sessions SET wrapped_dek = ? WHERE public_id = ?", (legacy, sealed))
    db.execute("UPDATE meta SET value = ? WHERE name = 'schema'", (b"1",))
    db.close()
    with FeatureCache(directory) as c:
        assert c.recover_session(sealed).complete
        assert all(same(a, b) for a, b in zip(c.read_session(sealed), records, strict=True))
        assert len(c.read_session(still_open)) == 2
    db = sqlite3.connect(directory / DB_NAME)
    assert db.execute("SELECT value FROM meta WHERE name = 'schema'").fetchone() == (b"2",)
    db.execute("UPDATE meta SET value = ? WHERE name = 'schema'", (b"9",))
    db.commit()
    db.close()
    with pytest.raises(CacheError, match="unsupported cache format"):
        FeatureCache(directory)


# -- keys ------------------------------------------------------------------------------------------------


def test_corrupt_index_file_is_a_clear_error(tmp_path: Path) -> None:
    directory = tmp_path / "c"
    directory.mkdir(mode=0o700)
    (directory / DB_NAME).write_bytes(b"this is not an SQLite database, " * 200)
    with pytest.raises(CacheError, match="unreadable or corrupt"):
        FeatureCache(directory)


def test_wrong_or_missing_kek_refuses_to_open(tmp_path: Path) -> None:
    directory = tmp_path / "c"
    with FeatureCache(directory) as c:
        c.append_batch(c.begin_session(), make_records(2))
    store = FileKeyStore(directory / KEY_FILE_NAME)
    good = store.load()
    store.save([KeyEncryptionKey.generate()])
    with pytest.raises(IntegrityError, match="does not open this cache"):
        FeatureCache(directory)
    store.destroy()
    with pytest.raises(KeyStoreError, match="missing"):
        FeatureCache(directory)
    store.save(good)
    with FeatureCache(directory) as c:
        assert c.sessions()[0].frames == 2


def test_key_file_is_created_0600_even_with_a_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        with FeatureCache(tmp_path / "c") as c:
            c.append_batch(c.begin_session(), make_records(2))
            files = sorted((tmp_path / "c").glob(DB_NAME + "*"))
            assert len(files) == 3  # the database, its WAL and shared-memory index, all 0600
            for path in files:
                assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    finally:
        os.umask(old)
    key_file = tmp_path / "c" / KEY_FILE_NAME
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "c").stat().st_mode) == 0o700
    assert len(key_file.read_bytes()) == 10 + 1 + 32
    assert not list((tmp_path / "c").glob(".*.tmp"))


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644, 0o602])
def test_key_file_with_group_or_other_access_is_refused(tmp_path: Path, mode: int) -> None:
    with FeatureCache(tmp_path / "c"):
        pass
    key_file = tmp_path / "c" / KEY_FILE_NAME
    key_file.chmod(mode)
    with pytest.raises(InsecureKeyFileError, match="0600"):
        FeatureCache(tmp_path / "c")


def test_symlinked_or_malformed_key_file_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real.kek"
    FileKeyStore(real).save([KeyEncryptionKey.generate()])
    link = tmp_path / "link.kek"
    link.symlink_to(real)
    with pytest.raises(InsecureKeyFileError):
        FileKeyStore(link).load()
    bad = tmp_path / "bad.kek"
    bad.write_bytes(b"FEDFERKEK1\x01" + b"\0" * 31)
    bad.chmod(0o600)
    with pytest.raises(KeyStoreError, match="malformed"):
        FileKeyStore(bad).load()
    with pytest.raises(ValidationError):
        FileKeyStore(bad).save([])


def test_keyring_store_reports_a_clear_error_without_the_package() -> None:
    # ``keyring`` is an optional dependency that is not installed here: the store must say so plainly.
    with pytest.raises(KeyStoreError, match="keyring"):
        KeyringKeyStore(account="/var/lib/fedfer/cache")
    # Without an OS keyring the default store is the 0600 file beside the cache.
    store = default_key_store(Path("/var/lib/fedfer/cache"))
    assert isinstance(store, FileKeyStore) and store.path == Path("/var/lib/fedfer/cache") / KEY_FILE_NAME


def test_interrupted_rotation_opens_with_the_committed_key(tmp_path: Path) -> None:
    directory = tmp_path / "c"
    store = FileKeyStore(directory / KEY_FILE_NAME)
    with FeatureCache(directory) as c:
        sid = c.begin_session()
        c.append_batch(sid, make_records(3))
    (committed,) = store.load()
    # Crash after the store got [old, new] but before the database committed: the old key is right.
    store.save([committed, KeyEncryptionKey.generate()])
    with FeatureCache(directory) as c:
        assert len(c.read_session(sid)) == 3
    assert [k.fingerprint for k in store.load()] == [committed.fingerprint]
    # Crash after the database committed the new key but before the store dropped the old one.
    with FeatureCache(directory) as c:
        c.rotate_kek()
    (new,) = store.load()
    assert new.fingerprint != committed.fingerprint
    store.save([committed, new])
    with FeatureCache(directory) as c:
        assert len(c.read_session(sid)) == 3
    assert [k.fingerprint for k in store.load()] == [new.fingerprint]


def test_rotation_by_another_instance_is_picked_up(tmp_path: Path) -> None:
    with FeatureCache(tmp_path / "c") as writer, FeatureCache(tmp_path / "c") as admin:
        sid = writer.begin_session()
        writer.append_batch(sid, make_records(3))
        doomed = admin.begin_session()
        admin.forget(doomed)  # rotates the KEK under the writer's feet
        writer.append_batch(sid, make_records(2, seed=5))
        fresh = writer.begin_session()  # wraps under the new KEK, found through the store
        writer.append_batch(fresh, make_records(1))
        assert len(admin.read_session(sid)) == 5
        assert len(admin.read_session(fresh)) == 1


# -- retention -------------------------------------------------------------------------------------------


def test_retention_by_age(tmp_path: Path) -> None:
    now = [850.0]
    with FeatureCache(tmp_path / "c", max_age_s=120.0, clock=lambda: now[0]) as c:
        old = c.begin_session()
        now[0] = 950.0
        mid = c.begin_session()
        c.append_batch(old, make_records(2))
        c.append_batch(mid, make_records(2))
        assert c.enforce_retention() == []
        now[0] = 1000.0
        assert c.enforce_retention() == [old]
        now[0] = 1080.0
        new = c.begin_session()  # enforces retention first: mid (950) is now older than 120 s
        assert [s.session_id for s in c.sessions()] == [new]
        with pytest.raises(SessionNotFoundError):
            c.read_session(mid)


def test_retention_by_size_drops_oldest_first(tmp_path: Path) -> None:
    per_session = 10 * (2590 + 28 + 29) + 61
    with FeatureCache(tmp_path / "c", max_bytes=3 * per_session + 100) as c:
        ids = []
        for i in range(3):
            sid = c.begin_session(created=100.0 + i)
            c.append_batch(sid, make_records(10, seed=i))
            ids.append(sid)
        assert c.total_bytes() == 3 * per_session
        fourth = c.begin_session(created=200.0)
        c.append_batch(fourth, make_records(10, seed=9))  # over the limit: the oldest goes
        assert [s.session_id for s in c.sessions()] == [*ids[1:], fourth]
        assert c.total_bytes() <= 3 * per_session + 100
        # The session being written is never dropped for size, even when it alone exceeds the limit.
        c.append_batch(fourth, make_records(40, seed=10))
        assert [s.session_id for s in c.sessions()] == [fourth]
        assert len(c.read_session(fourth)) == 50


@settings(max_examples=40, deadline=None)
@given(
    classes=st.integers(min_value=1, max_value=16),
    bits=st.binary(min_size=2560, max_size=2560),
    timestamp=st.floats(allow_nan=False, allow_infinity=False),
    score=st.floats(min_value=0.0, max_value=1.0),
)
def test_property_frame_codec_is_bit_exact(classes: int, bits: bytes, timestamp: float, score: float) -> None:
    feature = np.frombuffer(bits, dtype=np.float16).copy()  # any bit pattern, NaNs and infinities included
    probs = np.linspace(0, 1, classes, dtype=np.float32)
    box = (1.0, 2.0, 3.0, 4.0)
    record = FrameRecord(timestamp=timestamp, feature=feature, ifer_probs=probs, box=box, score=score)
    back = decode_frame(encode_frame(record))
    assert back.feature.tobytes() == bits and back.ifer_probs.tobytes() == probs.tobytes()
    assert back.timestamp == timestamp and back.box == record.box


@settings(max_examples=12, deadline=None)
@given(
    n=st.integers(min_value=1, max_value=12),
    tampered=st.sets(st.integers(min_value=0, max_value=11)),
    deleted=st.sets(st.integers(min_value=0, max_value=11)),
    seal=st.booleans(),
)
def test_property_recovery_reports_exactly_the_damaged_positions(
    n: int, tampered: set[int], deleted: set[int], seal: bool
) -> None:
    tampered = {p for p in tampered if p < n}
    deleted = {p for p in deleted if p < n} - tampered
    records = make_records(n)
    with tempfile.TemporaryDirectory() as tmp, FeatureCache(Path(tmp) / "c") as c:
        sid = c.begin_session()
        c.append_batch(sid, records)
        if seal:
            c.end_session(sid)
        db = raw_db(c)
        for p in tampered:
            blob = bytearray(blob_at(db, sid, p))
            blob[-1] ^= 0x80
            set_blob(db, sid, p, bytes(blob))
        for p in deleted:
            db.execute("DELETE FROM records WHERE sid = ? AND seq = ?", (sid_of(db, sid), p))
        db.close()
        contents = c.recover_session(sid)
        assert contents.failed == tuple(sorted(tampered | deleted))
        assert [p for p, _ in contents.records] == [p for p in range(n) if p not in tampered | deleted]
        assert all(same(r, records[p]) for p, r in contents.records)
        assert contents.complete == (seal and not tampered and not deleted)
