"""Named blobs in the encrypted cache (the personalized model lives there): sealed, bound, shredded.

What happens in each case: a blob round-trips and survives every KEK rotation; a tampered, truncated or
moved ciphertext (or wrapped key) fails with an integrity error naming the blob while the sessions stay
readable; replacing or deleting a blob leaves its old ciphertext nowhere on disk and an old copy of the
database cannot be opened with the key that remains; purge deletes them all.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from fedfer.agent.errors import ModelFileError
from fedfer.agent.models.export import pack_exported, unpack_exported
from fedfer.agent.records import FrameRecord
from fedfer.agent.store.cache import DB_NAME, KEY_FILE_NAME, BlobNotFoundError, FeatureCache
from fedfer.agent.store.keys import FileKeyStore
from fedfer.security.envelope import RecordKind
from fedfer.security.errors import IntegrityError, ValidationError
from tests.agent.test_cache import make_records, same
from tests.agent.test_cache_shredding import disk_bytes, restore_copy


def _same_all(a: list[FrameRecord], b: list[FrameRecord]) -> bool:
    return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))


def _blob_row(db_path: Path, name: str) -> tuple[bytes, bytes]:
    conn = sqlite3.connect(db_path)
    try:
        wrapped, blob = conn.execute("SELECT wrapped_dek, blob FROM blobs WHERE name = ?", (name,)).fetchone()
    finally:
        conn.close()
    return bytes(wrapped), bytes(blob)


def _set_blob_row(
    db_path: Path, name: str, *, wrapped: bytes | None = None, blob: bytes | None = None
) -> None:
    conn = sqlite3.connect(db_path)
    try:
        if wrapped is not None:
            conn.execute("UPDATE blobs SET wrapped_dek = ? WHERE name = ?", (wrapped, name))
        if blob is not None:
            conn.execute("UPDATE blobs SET blob = ? WHERE name = ?", (blob, name))
        conn.commit()
    finally:
        conn.close()


def test_a_blob_round_trips_survives_rotations_and_is_never_on_disk_in_clear(tmp_path: Path) -> None:
    data = os.urandom(50_000)
    with FeatureCache(tmp_path) as cache:
        sid = cache.begin_session()
        records = make_records(4)
        cache.append_batch(sid, records)
        cache.put_blob("personal-v", data)
        assert cache.get_blob("personal-v") == data
        assert cache.blob_names() == ["personal-v"]
        assert [s.session_id for s in cache.sessions()] == [sid]  # a blob is not a session
        cache.end_session(sid)  # rotates the KEK: the blob's key is re-wrapped
        other = cache.begin_session()
        cache.append(other, make_records(1)[0])
        cache.forget(other)  # rotates again
        cache.rotate_kek()
        assert cache.get_blob("personal-v") == data
    with FeatureCache(tmp_path) as cache:  # reopened
        assert cache.get_blob("personal-v") == data
        assert _same_all(cache.read_session(sid), records)
    image = b"".join(disk_bytes(tmp_path).values())
    assert data[:64] not in image and data[-64:] not in image


def test_tampered_truncated_or_moved_blobs_fail_clearly_and_the_rest_stays_readable(tmp_path: Path) -> None:
    db = tmp_path / DB_NAME
    with FeatureCache(tmp_path) as cache:
        sid = cache.begin_session()
        records = make_records(3)
        cache.append_batch(sid, records)
        cache.put_blob("a", b"first blob")
        cache.put_blob("b", b"second blob")
    wrapped_a, blob_a = _blob_row(db, "a")
    wrapped_b, blob_b = _blob_row(db, "b")

    flipped = bytearray(blob_a)
    flipped[20] ^= 1
    cases = {
        "flipped ciphertext": dict(blob=bytes(flipped)),
        "truncated ciphertext": dict(blob=blob_a[:-5]),
        "another blob's ciphertext": dict(blob=blob_b),
        "another blob's key and ciphertext": dict(wrapped=wrapped_b, blob=blob_b),
        "flipped wrapped key": dict(wrapped=wrapped_a[:-1] + bytes([wrapped_a[-1] ^ 1])),
    }
    for case, change in cases.items():
        _set_blob_row(db, "a", **change)
        with FeatureCache(tmp_path) as cache:
            with pytest.raises(IntegrityError, match="cache blob a failed verification"):
                cache.get_blob("a")
            assert cache.get_blob("b") == b"second blob", case
            assert _same_all(cache.read_session(sid), records), case
        _set_blob_row(db, "a", wrapped=wrapped_a, blob=blob_a)
    with FeatureCache(tmp_path) as cache:
        assert cache.get_blob("a") == b"first blob"
        # A blob's binding cannot be confused with a session's, nor its kind with a frame's.
        with pytest.raises(IntegrityError):
            cache._kek.unwrap_data_key(wrapped_a, cache_id=cache._cache_id, session_id=sid.encode())
        assert RecordKind.BLOB not in (RecordKind.FRAME, RecordKind.SEAL)


def test_replacing_or_deleting_a_blob_shreds_the_old_version(tmp_path: Path) -> None:
    old, new = os.urandom(4096), os.urandom(4096)
    with FeatureCache(tmp_path) as cache:
        cache.put_blob("personal-v", old)
        before = disk_bytes(tmp_path)
        kek_before = (tmp_path / KEY_FILE_NAME).read_bytes()
        _, old_ciphertext = _blob_row(tmp_path / DB_NAME, "personal-v")
        cache.put_blob("personal-v", new)
        assert cache.get_blob("personal-v") == new
        assert (tmp_path / KEY_FILE_NAME).read_bytes() != kek_before  # replacing rotates the KEK
        image = b"".join(disk_bytes(tmp_path).values())
        assert old_ciphertext[-48:] not in image  # zeroed (secure_delete), WAL truncated
        assert cache.delete_blob("personal-v") is True
        assert cache.delete_blob("personal-v") is False
        with pytest.raises(BlobNotFoundError):
            cache.get_blob("personal-v")
        assert cache.blob_names() == []
    # An attacker's copy of the database from before: its blob row is there, the remaining key opens nothing.
    copy = restore_copy({k: v for k, v in before.items() if k != KEY_FILE_NAME}, tmp_path / "copy")
    (copy.parent / KEY_FILE_NAME).write_bytes((tmp_path / KEY_FILE_NAME).read_bytes())
    os.chmod(copy.parent / KEY_FILE_NAME, 0o600)
    with pytest.raises(IntegrityError):
        FeatureCache(copy.parent, key_store=FileKeyStore(copy.parent / KEY_FILE_NAME))


def test_purge_deletes_every_blob_and_names_and_sizes_are_validated(tmp_path: Path) -> None:
    with FeatureCache(tmp_path) as cache:
        cache.put_blob("x", b"1")
        cache.put_blob("y-2", b"2")
        for bad in ("", "Upper", "../etc", "a" * 65, "with space", "0123456789abcdef0123456789abcdef/x"):
            with pytest.raises(ValidationError):
                cache.put_blob(bad, b"z")
        with pytest.raises(ValidationError):
            cache.put_blob("x", "not bytes")  # type: ignore[arg-type]
        cache.purge()
        assert cache.blob_names() == []
        with pytest.raises(BlobNotFoundError):
            cache.get_blob("x")


def test_a_packed_model_round_trips_and_refuses_truncation_and_tampering() -> None:
    arrays = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(3, dtype=np.float32)}
    data = pack_exported("personal", arrays, {"kind": "v", "base_version": "7"})
    back, meta = unpack_exported(data)
    assert meta["kind"] == "v" and meta["base_version"] == "7" and meta["parameters"] == 15
    assert all(np.array_equal(back[k], arrays[k]) for k in arrays)
    for broken in (data[:3], data[:40], data[:-10], data[:-1] + bytes([data[-1] ^ 1])):
        with pytest.raises(ModelFileError):
            unpack_exported(broken)
