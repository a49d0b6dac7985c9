"""A writer killed with SIGKILL mid-write loses at most what was in flight, and the cache opens afterwards."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from fedfer.agent.store.cache import FeatureCache
from tests.agent.test_cache import make_records, same

REPO = Path(__file__).resolve().parents[2]

# The child appends forever and prints the index of every batch it has committed; the parent kills it.
WRITER = textwrap.dedent(
    """
    import sys
    from fedfer.agent.store.cache import FeatureCache
    from tests.agent.test_cache import make_records

    directory, batch, sync = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    cache = FeatureCache(directory, synchronous=sync)
    sid = cache.begin_session()
    print(sid, flush=True)
    i = 0
    while True:
        cache.append_batch(sid, make_records(batch, seed=i, t0=float(i)))
        print(i, flush=True)
        i += 1
    """
)

# The child churns sessions: begin, append, and (with "forget") forget every other one, or (with "seal")
# seal every one, both of which rotate the KEK; it prints each session it keeps.
CHURN = textwrap.dedent(
    """
    import sys
    from fedfer.agent.store.cache import FeatureCache
    from tests.agent.test_cache import make_records

    cache = FeatureCache(sys.argv[1], synchronous="NORMAL")
    i = 0
    while True:
        sid = cache.begin_session()
        cache.append_batch(sid, make_records(4, seed=i))
        if i % 2 and sys.argv[2] == "forget":
            cache.forget(sid)
        else:
            if sys.argv[2] == "seal":
                cache.end_session(sid)
            print(sid, flush=True)
        i += 1
    """
)


def run_and_kill(script: str, args: list[str], *, after_lines: int) -> list[str]:
    """Start ``script``, wait for ``after_lines`` lines, SIGKILL it, and return every line it printed."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", script, *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 60
    while len(lines) < after_lines and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line.strip())
    os.kill(proc.pid, signal.SIGKILL)
    rest, err = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL, err
    assert len(lines) >= after_lines, err
    return lines + [line for line in rest.splitlines() if line]


@pytest.mark.parametrize(("batch", "sync"), [(1, "FULL"), (16, "NORMAL")])
def test_sigkill_mid_append_loses_at_most_the_batch_in_flight(tmp_path: Path, batch: int, sync: str) -> None:
    directory = tmp_path / "cache"
    lines = run_and_kill(WRITER, [str(directory), str(batch), sync], after_lines=1 + 25)
    sid, committed = lines[0], len(lines) - 1  # batches 0 .. committed-1 were reported as committed
    with FeatureCache(directory) as cache:
        contents = cache.recover_session(sid)
        assert contents.failed == ()
        stored = len(contents.records)
        # Every reported batch is there; at most the one in flight (committed, not yet printed) more.
        assert stored in (committed * batch, (committed + 1) * batch), (stored, committed)
        for b in range(stored // batch):
            expected = make_records(batch, seed=b, t0=float(b))
            got = [r for _, r in contents.records[b * batch : (b + 1) * batch]]
            assert all(same(x, y) for x, y in zip(got, expected, strict=True))
        # The cache is fully usable after the crash.
        cache.append_batch(sid, make_records(2, seed=99))
        assert len(cache.read_session(sid)) == stored + 2


@pytest.mark.parametrize("mode", ["forget", "seal"])
def test_sigkill_during_forget_or_seal_leaves_an_openable_cache(tmp_path: Path, mode: str) -> None:
    directory = tmp_path / "cache"
    kept = run_and_kill(CHURN, [str(directory), mode], after_lines=6)
    with FeatureCache(directory) as cache:
        infos = cache.sessions()
        assert set(kept) <= {info.session_id for info in infos}
        for info in infos:
            # Every surviving session opens under whichever KEK the database committed to.
            contents = cache.recover_session(info.session_id)
            assert contents.failed == ()
            if mode == "seal" and info.session_id in kept:  # reported after its seal committed
                assert contents.complete and len(contents.records) == 4
        fresh = cache.begin_session()
        cache.append_batch(fresh, make_records(1))
        cache.forget(fresh)


def test_concurrent_writer_process_survives_kek_rotations(tmp_path: Path) -> None:
    directory = tmp_path / "cache"
    with FeatureCache(directory):  # create it first so both processes share one KEK from the start
        pass
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", CHURN, str(directory), "keep"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    kept: list[str] = []
    try:
        with FeatureCache(directory) as admin:
            for round_ in range(10):
                doomed = admin.begin_session()
                admin.append_batch(doomed, make_records(2, seed=round_))
                admin.forget(doomed)  # rotates the KEK while the writer begins sessions and appends
                line = proc.stdout.readline().strip()  # the writer kept going meanwhile
                if not line:
                    pytest.fail(f"the writer died: {proc.communicate(timeout=30)[1]}")
                kept.append(line)
                for sid in kept:  # every session the writer made opens, whichever KEK wrapped it
                    assert admin.recover_session(sid).failed == ()
                    assert len(admin.read_session(sid)) == 4
            assert proc.poll() is None  # the writer never failed
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=30)
    assert "Error" not in err, err
    with FeatureCache(directory) as cache:
        assert {info.session_id for info in cache.sessions()} >= set(kept)
