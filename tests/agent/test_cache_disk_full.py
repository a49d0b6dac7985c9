"""The feature cache on a real full disk (a small tmpfs mounted for the test).

What happens: a write that does not fit fails with :class:`CacheFullError` (an ``OSError`` with ``ENOSPC``
and a plain message) and stores nothing of itself; every record stored before stays readable, also from a
freshly opened cache. Deleting never needs space that is not there: ``forget`` and ``purge`` work on the
full disk (the cache gives up its space reserve, and ``purge`` can fall back to destroying the key and the
files), and afterwards the cache takes new sessions again.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedfer.agent.records import FrameRecord
from fedfer.agent.store.cache import RESERVE_NAME, CacheFullError, FeatureCache, SessionNotFoundError
from tests.agent.small_disk import mounted_tmpfs
from tests.agent.test_cache import make_records, same

RESERVE = 1024 * 1024


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs: a real file system that runs out of space."""
    with mounted_tmpfs(tmp_path / "disk", "8m") as mount:
        yield mount


def _fill(cache: FeatureCache, session_id: str) -> list[FrameRecord]:
    """Append batches until the disk is full; returns what was stored."""
    stored: list[FrameRecord] = []
    for i in range(10_000):
        batch = make_records(8, seed=i)
        try:
            cache.append_batch(session_id, batch)
        except CacheFullError as exc:
            assert exc.errno == errno.ENOSPC and isinstance(exc, OSError)
            assert str(exc).endswith("no space left on the device to write to the feature cache")
            return stored
        stored += batch
    raise AssertionError("the disk never filled up")


def _same_all(a: list[FrameRecord], b: list[FrameRecord]) -> bool:
    return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))


def test_a_full_disk_refuses_the_write_and_keeps_everything_stored_then_forget_and_purge_free_it(
    tiny_disk: Path,
) -> None:
    directory = tiny_disk / "cache"
    with FeatureCache(directory, reserve_bytes=RESERVE) as cache:
        assert (directory / RESERVE_NAME).stat().st_size == RESERVE
        first = cache.begin_session()
        kept = make_records(5, seed=99)
        cache.append_batch(first, kept)
        cache.end_session(first)
        victim = cache.begin_session()
        stored = _fill(cache, victim)
        assert len(stored) > 100
        # Nothing stored is lost, and the failed batch left nothing behind.
        assert cache.session_info(victim).frames == len(stored)
        assert _same_all(cache.read_session(victim), stored)
        with pytest.raises(CacheFullError):
            cache.append_batch(victim, make_records(8, seed=10_001))
        assert cache.session_info(victim).frames == len(stored)
    with FeatureCache(directory, reserve_bytes=RESERVE) as cache:  # opens on the full disk
        assert _same_all(cache.read_session(first), kept)
        assert _same_all(cache.read_session(victim), stored)
        # forget works on the full disk (it gives up the reserve) and frees the space.
        cache.forget(victim)
        with pytest.raises(SessionNotFoundError):
            cache.read_session(victim)
        assert _same_all(cache.read_session(first), kept)
        assert (directory / RESERVE_NAME).stat().st_size == RESERVE  # made whole again afterwards
        again = cache.begin_session()
        cache.append_batch(again, make_records(8, seed=7))  # room again
        _fill(cache, again)
        # purge works on the full disk too, and leaves an empty cache that takes new sessions.
        cache.purge()
        assert cache.sessions() == []
        fresh = cache.begin_session()
        cache.append_batch(fresh, make_records(8, seed=8))
        assert len(cache.read_session(fresh)) == 8


def test_forget_frees_a_session_larger_than_the_reserve(tiny_disk: Path) -> None:
    """A session bigger than the reserve cannot go in one transaction: it goes in batches, data key last."""
    directory = tiny_disk / "cache"
    with FeatureCache(directory, reserve_bytes=RESERVE) as cache:
        victim = cache.begin_session()
        stored = _fill(cache, victim)
        assert cache.session_info(victim).bytes > 4 * RESERVE
        cache.forget(victim)
        assert cache.sessions() == []
        assert (directory / RESERVE_NAME).stat().st_size == RESERVE
        fresh = cache.begin_session()
        cache.append_batch(fresh, make_records(8, seed=3))
        assert len(cache.read_session(fresh)) == 8
        assert len(stored) > 1000
