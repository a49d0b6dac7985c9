"""forget() and purge(): crypto-shredding leaves nothing decryptable on disk, even against an old copy."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest

from fedfer.agent.store.cache import DB_NAME, KEY_FILE_NAME, FeatureCache, SessionNotFoundError
from fedfer.agent.store.keys import FileKeyStore
from fedfer.security.envelope import KeyEncryptionKey, RecordKind
from fedfer.security.errors import IntegrityError
from tests.agent.test_cache import make_records, same


def disk_bytes(directory: Path) -> dict[str, bytes]:
    """Every file of the cache directory, as an attacker imaging the disk would see it."""
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def session_secrets(db_path: Path, session_id: str) -> tuple[bytes, list[tuple[int, bytes]]]:
    """The wrapped data key and the (position, ciphertext) records of a session, read straight from SQLite."""
    conn = sqlite3.connect(db_path)
    try:
        sid, wrapped = conn.execute(
            "SELECT sid, wrapped_dek FROM sessions WHERE public_id = ?", (session_id,)
        ).fetchone()
        rows = conn.execute(
            "SELECT seq, blob FROM records WHERE sid = ? AND kind = ? ORDER BY seq", (sid, RecordKind.FRAME)
        ).fetchall()
    finally:
        conn.close()
    return bytes(wrapped), [(int(seq), bytes(blob)) for seq, blob in rows]


def all_wrapped_keys(db_path: Path) -> list[tuple[str, bytes]]:
    conn = sqlite3.connect(db_path)
    try:
        return [(str(p), bytes(w)) for p, w in conn.execute("SELECT public_id, wrapped_dek FROM sessions")]
    finally:
        conn.close()


def restore_copy(files: dict[str, bytes], directory: Path) -> Path:
    """Write an earlier image of the cache directory somewhere else (the attacker's old backup)."""
    directory.mkdir()
    for name, data in files.items():
        (directory / name).write_bytes(data)
    return directory / DB_NAME


def cannot_decrypt(
    ciphertexts: list[tuple[int, bytes]],
    session_id: str,
    cache_id: bytes,
    keks: list[KeyEncryptionKey],
    wrapped_keys: list[tuple[str, bytes]],
) -> bool:
    """True when no KEK and no wrapped key at hand opens any of the ciphertexts, under any binding
    (the wrapped key's owner or the session, each open or sealed)."""
    for kek in keks:
        for owner, wrapped in wrapped_keys:
            for claimed in {owner, session_id, owner + "/sealed", session_id + "/sealed"}:
                try:
                    dek = kek.unwrap_data_key(wrapped, cache_id=cache_id, session_id=claimed.encode())
                except IntegrityError:
                    continue
                for seq, blob in ciphertexts:
                    try:
                        dek.decrypt_record(
                            blob,
                            cache_id=cache_id,
                            session_id=session_id.encode(),
                            position=seq,
                            kind=RecordKind.FRAME,
                        )
                    except IntegrityError:
                        continue
                    return False
    return True


def cache_id_of(db_path: Path) -> bytes:
    conn = sqlite3.connect(db_path)
    try:
        (value,) = conn.execute("SELECT value FROM meta WHERE name = 'cache_id'").fetchone()
    finally:
        conn.close()
    return bytes(value)


def test_forget_shreds_the_session_and_an_old_copy_stays_sealed(tmp_path: Path) -> None:
    directory = tmp_path / "cache"
    keep_records = make_records(20, seed=1)
    with FeatureCache(directory) as cache:
        doomed = cache.begin_session()
        keep = cache.begin_session()
        cache.append_batch(doomed, make_records(50, seed=0))
        cache.append_batch(keep, keep_records)
        cache.end_session(doomed)
        wrapped, blobs = session_secrets(cache.database_path, doomed)
        cache_id = cache_id_of(cache.database_path)
        before = disk_bytes(directory)
        old_kek = FileKeyStore(directory / KEY_FILE_NAME).load()[0]
        # Sanity: the old copy really does open with the old key (so the checks below can fail).
        assert not cannot_decrypt(blobs[:1], doomed, cache_id, [old_kek], [(doomed, wrapped)])

        cache.forget(doomed)

        with pytest.raises(SessionNotFoundError):
            cache.read_session(doomed)
        assert all(same(a, b) for a, b in zip(cache.read_session(keep), keep_records, strict=True))
        after = disk_bytes(directory)

    # Nothing of the forgotten session is left in any file: not its wrapped key, not one ciphertext.
    assert set(after) <= set(before)
    assert after.get(DB_NAME + "-wal", b"") == b""  # the WAL was folded in and truncated
    for name, data in after.items():
        assert wrapped not in data, name
        for _, blob in blobs:
            assert blob[13:77] not in data, name
    # The KEK was rotated: the old key's bytes are gone too.
    old_material = old_kek.dangerously_export_plaintext()
    assert all(old_material not in data for data in after.values())

    # With what remains on disk (current KEK, every wrapped key now stored) neither the old ciphertexts
    # nor the old backup's wrapped key can be opened.
    current_keks = FileKeyStore(directory / KEY_FILE_NAME).load()
    remaining = all_wrapped_keys(directory / DB_NAME)
    assert [owner for owner, _ in remaining] == [keep]
    assert cannot_decrypt(blobs, doomed, cache_id, current_keks, [*remaining, (doomed, wrapped)])
    backup_db = restore_copy(before, tmp_path / "old-backup")
    old_wrapped, old_blobs = session_secrets(backup_db, doomed)
    assert old_wrapped == wrapped and len(old_blobs) == 50
    assert cannot_decrypt(old_blobs, doomed, cache_id, current_keks, all_wrapped_keys(backup_db))


def test_forget_without_rotation_still_removes_the_key_from_disk(tmp_path: Path) -> None:
    directory = tmp_path / "cache"
    with FeatureCache(directory, rotate_kek_on_forget=False) as cache:
        doomed = cache.begin_session()
        cache.append_batch(doomed, make_records(10))
        wrapped, blobs = session_secrets(cache.database_path, doomed)
        fingerprint = FileKeyStore(directory / KEY_FILE_NAME).load()[0].fingerprint
        cache.forget(doomed)
        assert cache.sessions() == []
        after = disk_bytes(directory)  # while the cache is still open: no close-time checkpoint helps
    assert FileKeyStore(directory / KEY_FILE_NAME).load()[0].fingerprint == fingerprint
    for data in after.values():
        assert wrapped not in data
        assert all(blob[13:77] not in data for _, blob in blobs)
    with pytest.raises(SessionNotFoundError):
        FeatureCache(directory).forget(doomed)


def test_purge_forgets_everything_and_replaces_the_kek(tmp_path: Path) -> None:
    directory = tmp_path / "cache"
    with FeatureCache(directory) as cache:
        ids = [cache.begin_session() for _ in range(3)]
        for i, sid in enumerate(ids):
            cache.append_batch(sid, make_records(15, seed=i))
        secrets = [session_secrets(cache.database_path, sid) for sid in ids]
        cache_id = cache_id_of(cache.database_path)
        before = disk_bytes(directory)
        old_material = before[KEY_FILE_NAME][-32:]

        cache.purge()

        assert cache.sessions() == [] and cache.total_bytes() == 0
        after = disk_bytes(directory)
        new_kek = FileKeyStore(directory / KEY_FILE_NAME).load()
        assert new_kek[0].dangerously_export_plaintext() != old_material
        for data in after.values():
            assert old_material not in data
            for wrapped, blobs in secrets:
                assert wrapped not in data
                assert all(blob[13:77] not in data for _, blob in blobs)
        backup_db = restore_copy(before, tmp_path / "old-backup")
        for sid, (_, blobs) in zip(ids, secrets, strict=True):
            assert cannot_decrypt(blobs, sid, cache_id, new_kek, all_wrapped_keys(backup_db))
        # The cache is immediately usable again under the new key.
        fresh = cache.begin_session()
        cache.append_batch(fresh, make_records(3, seed=7))
        assert len(cache.read_session(fresh)) == 3
    with FeatureCache(directory) as again:
        assert [s.session_id for s in again.sessions()] == [fresh]
    shutil.rmtree(tmp_path / "old-backup")
