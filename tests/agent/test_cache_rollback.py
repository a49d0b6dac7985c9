"""Rollback of the cache's index to an older copy: what is refused, and what (as documented) is not.

The attacker copies the index (the SQLite database and its WAL) from the disk, lets the agent work, then puts
the copy back. Every seal, forget, retention drop, purge and explicit rotation replaces the KEK, and the key
store keeps only the current one, so a copy from before the latest of these no longer opens. A copy taken
after it can only lose what was appended to still-open sessions since; and a rollback of the key store
together with the index cannot be detected at all. Both limits are in the module docstring of
agent/store/cache.py and in docs/privacy.md, and are tested here as documented.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from fedfer.agent.store.cache import DB_NAME, KEY_FILE_NAME, FeatureCache
from fedfer.agent.store.keys import FileKeyStore
from fedfer.security.errors import IntegrityError
from tests.agent.test_cache import make_records, same
from tests.agent.test_cache_shredding import cache_id_of, cannot_decrypt, session_secrets


def index_copy(directory: Path) -> dict[str, bytes]:
    """The index as an attacker imaging the disk gets it: the database and its WAL (no key file)."""
    files = {p.name: p.read_bytes() for p in directory.glob(DB_NAME + "*") if not p.name.endswith("-shm")}
    assert DB_NAME in files
    return files


def put_back(directory: Path, files: dict[str, bytes]) -> None:
    """Replace the index files in ``directory`` by ``files`` (the cache must be closed)."""
    for path in directory.glob(DB_NAME + "*"):
        path.unlink()
    for name, data in files.items():
        (directory / name).write_bytes(data)


def test_index_copied_before_a_forget_is_refused_and_the_session_stays_shredded(tmp_path: Path) -> None:
    directory = tmp_path / "cache"
    kept_records = make_records(5, seed=2)
    with FeatureCache(directory) as cache:
        doomed, kept = cache.begin_session(), cache.begin_session()
        cache.append_batch(doomed, make_records(8, seed=1))
        cache.append_batch(kept, kept_records)
        old = index_copy(directory)
        assert (DB_NAME + "-wal") in old  # the copy holds uncheckpointed frames: the WAL matters
        cache_id = cache_id_of(cache.database_path)
        cache.forget(doomed)
        current = index_copy(directory)
    put_back(directory, old)
    with pytest.raises(IntegrityError, match="key-encryption key does not open this cache"):
        FeatureCache(directory)
    # Not only the open: the old copy's wrapped key and records open under no key the device holds now.
    wrapped, blobs = session_secrets(directory / DB_NAME, doomed)
    assert len(blobs) == 8
    keks = FileKeyStore(directory / KEY_FILE_NAME).load()
    assert cannot_decrypt(blobs, doomed, cache_id, keks, [(doomed, wrapped)])
    # The refusal changed nothing: the genuine index opens again, without the forgotten session.
    put_back(directory, current)
    with FeatureCache(directory) as cache:
        assert [s.session_id for s in cache.sessions()] == [kept]
        assert all(same(a, b) for a, b in zip(cache.read_session(kept), kept_records, strict=True))


def test_index_copied_before_a_seal_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "cache"
    with FeatureCache(directory) as cache:
        sid = cache.begin_session()
        cache.append_batch(sid, make_records(6))
        old = index_copy(directory)
        cache.end_session(sid)
    put_back(directory, old)
    with pytest.raises(IntegrityError, match="does not open this cache"):
        FeatureCache(directory)


def test_a_forgotten_session_put_back_row_by_row_fails_alone(tmp_path: Path) -> None:
    directory = tmp_path / "cache"
    kept_records = make_records(3, seed=5)
    with FeatureCache(directory) as cache:
        doomed, kept = cache.begin_session(), cache.begin_session()
        cache.append_batch(doomed, make_records(4))
        cache.append_batch(kept, kept_records)
        wrapped, blobs = session_secrets(cache.database_path, doomed)
        cache.forget(doomed)
        # Re-insert the forgotten session's rows (saved before the forget) into the live index.
        db = sqlite3.connect(cache.database_path, isolation_level=None)
        db.execute(
            "INSERT INTO sessions (public_id, created, wrapped_dek, frames, bytes) VALUES (?, 0, ?, 4, 0)",
            (doomed, wrapped),
        )
        (sid,) = db.execute("SELECT sid FROM sessions WHERE public_id = ?", (doomed,)).fetchone()
        db.executemany(
            "INSERT INTO records (sid, seq, kind, blob) VALUES (?, ?, 1, ?)",
            [(sid, seq, blob) for seq, blob in blobs],
        )
        db.close()
        with pytest.raises(IntegrityError, match=f"data key of session {doomed} failed verification"):
            cache.read_session(doomed)
        assert all(same(a, b) for a, b in zip(cache.read_session(kept), kept_records, strict=True))
        cache.forget(doomed)  # and it can be removed again
        assert [s.session_id for s in cache.sessions()] == [kept]


def test_documented_limit_rollback_after_the_last_rotation_loses_open_appends(tmp_path: Path) -> None:
    # Not detected (documented): a copy taken after the latest seal/forget/rotation opens, and loses only
    # what was appended to open sessions, or begun, since the copy; sealed sessions are untouched.
    directory = tmp_path / "cache"
    records = make_records(6, seed=3)
    with FeatureCache(directory) as cache:
        sealed = cache.begin_session()
        cache.append_batch(sealed, make_records(4, seed=4))
        cache.end_session(sealed)
        growing = cache.begin_session()
        cache.append_batch(growing, records[:3])
        old = index_copy(directory)
        cache.append_batch(growing, records[3:])
        later = cache.begin_session()
        cache.append_batch(later, make_records(2, seed=6))
    put_back(directory, old)
    with FeatureCache(directory) as cache:
        assert [s.session_id for s in cache.sessions()] == [sealed, growing]
        assert cache.recover_session(sealed).complete
        contents = cache.recover_session(growing)
        assert contents.failed == () and not contents.complete
        assert [p for p, _ in contents.records] == [0, 1, 2]  # looks like a writer that stopped early


def test_documented_limit_rollback_of_the_key_store_with_the_index(tmp_path: Path) -> None:
    # Not detected (documented): whoever copied the key file with the index can read what that KEK
    # protected, even after a forget (the KEK file on the device is wiped, but the copy is not).
    directory = tmp_path / "cache"
    records = make_records(4)
    with FeatureCache(directory) as cache:
        doomed = cache.begin_session()
        cache.append_batch(doomed, records)
        old = {**index_copy(directory), KEY_FILE_NAME: (directory / KEY_FILE_NAME).read_bytes()}
        cache.forget(doomed)
    put_back(directory, old)
    (directory / KEY_FILE_NAME).write_bytes(old[KEY_FILE_NAME])
    with FeatureCache(directory) as cache:
        assert all(same(a, b) for a, b in zip(cache.read_session(doomed), records, strict=True))


def test_documented_limit_forget_without_rotation_can_be_rolled_back(tmp_path: Path) -> None:
    # Not detected (documented): with rotate_kek_on_forget=False a forget leaves the KEK in place, so a copy
    # of the index from before it still opens, forgotten session included. The default rotates.
    directory = tmp_path / "cache"
    records = make_records(3)
    with FeatureCache(directory, rotate_kek_on_forget=False) as cache:
        doomed = cache.begin_session()
        cache.append_batch(doomed, records)
        old = index_copy(directory)
        cache.forget(doomed)
    put_back(directory, old)
    with FeatureCache(directory) as cache:
        assert all(same(a, b) for a, b in zip(cache.read_session(doomed), records, strict=True))
