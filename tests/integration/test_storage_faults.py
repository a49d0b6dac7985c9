"""Storage faults against the real command lines: ``fedfer-aggregator serve``, ``token`` and ``status`` on a
damaged database, and a real round whose SQLite database sits on a small tmpfs that fills up.

Issue 12, findings 3, 8 and 9: a zero-byte database started as a fresh, empty deployment; corruption gave
tracebacks (``UnicodeDecodeError``, ``sqlite3.DatabaseError``) or went unnoticed until later; a full disk gave
devices a non-retryable ``INTERNAL`` and made the aggregator exit with "lost the coordinator lease".
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.agent.small_disk import mounted_tmpfs
from tests.integration.federation_harness import Deployment, Device, random_updates, run_cli_result
from tests.sqlite_damage import zero_btree_page

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A deployment with two enrolled devices and an unused token, its server stopped cleanly."""
    root = tmp_path_factory.mktemp("pristine")
    dep = Deployment(root / "agg", min_clients=2, max_clients=2, deadline_s=20)
    agg = dep.serve()
    try:
        dep.enroll_devices(2, agg.enroll_port, root)
        dep.token()
    finally:
        assert agg.kill(signal.SIGTERM) == 0  # a clean stop checkpoints the WAL into the file
    assert not Path(f"{dep.dir / 'aggregator.db'}-wal").exists()
    return dep.dir


def _damage(path: Path, how: str, seed: int = 0) -> None:
    data = path.read_bytes()
    if how == "zero bytes":
        path.write_bytes(b"")
    elif how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "zeroed b-tree page":
        zero_btree_page(path, "tokens")
    else:  # 50 random byte flips in the pages after the header (the deep damage)
        flipped = bytearray(data)
        rng = np.random.default_rng(seed)
        for pos in rng.choice(np.arange(100, len(data)), size=50, replace=False):
            flipped[pos] ^= 0xFF
        path.write_bytes(bytes(flipped))
    for suffix in ("-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def _copy(pristine: Path, deployment: Path) -> Path:
    """A copy of the pristine deployment at ``deployment`` (its configuration pointing at the copy)."""
    shutil.copytree(pristine, deployment)
    config = deployment / "aggregator.toml"
    config.write_text(config.read_text().replace(str(pristine.resolve()), str(deployment.resolve())))
    return deployment / "aggregator.db"


def _one_line_error(stderr: str) -> str:
    """The command's error, which must be its whole stderr: one ``fedfer-aggregator: error:`` line."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("fedfer-aggregator: error: ")]
    assert len(errors) == 1 and errors[0] == lines[-1], stderr[-2000:]
    return errors[0].removeprefix("fedfer-aggregator: error: ")


def _run(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    try:
        return run_cli_result("fedfer-aggregator", *args, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"fedfer-aggregator {args[0]} kept running on a damaged database (it should refuse)")


@pytest.mark.parametrize(
    ("how", "reasons"),
    [
        ("zero bytes", ("is empty (0 bytes): refusing to start an empty deployment over it; the file is",)),
        ("truncated", ("is truncated",)),
        ("zeroed b-tree page", ("fails its integrity check", "is damaged (SQLITE_CORRUPT)")),
    ],
)
def test_a_damaged_database_is_refused_by_every_command_with_a_clear_message_and_kept(
    pristine: Path, tmp_path: Path, how: str, reasons: tuple[str, ...]
) -> None:
    """Findings 3 and 9: every command exits 2 with one line saying what is wrong; the file is untouched.

    Before: the zero-byte file started as a fresh deployment (ready, 0 devices) and the zeroed page started
    normally, until ``token`` died with a ``sqlite3.DatabaseError`` traceback.
    """
    db = _copy(pristine, tmp_path / "agg")
    deployment = db.parent
    _damage(db, how)
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    for args in (
        ("serve", "--config", str(deployment / "aggregator.toml")),
        ("token", str(deployment)),
        ("status", str(deployment)),
    ):
        done = _run(*args, timeout=25.0)
        assert done.returncode == 2, (args[0], done.returncode, done.stderr[-800:])
        assert "Traceback" not in done.stderr, done.stderr[-2000:]
        error = _one_line_error(done.stderr)
        assert any(reason in error for reason in reasons), error
        assert "the file is kept as it is" in error, error
        assert done.stdout.strip() == ""  # not ready, no token, no status
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before  # kept exactly as it was
    assert sorted(p.name for p in deployment.iterdir()) == sorted(p.name for p in pristine.iterdir())


def test_random_byte_flips_give_one_clean_line_never_a_traceback(pristine: Path, tmp_path: Path) -> None:
    """Finding 9: before, 50 flipped bytes crashed ``status`` and ``token`` with a ``UnicodeDecodeError``
    traceback (seeds 0, 5 and 8 here). Flips that land in blobs or free space are harmless to these commands,
    so a command may also just work."""
    refused = 0
    for seed in (0, 3, 5, 8):
        db = _copy(pristine, tmp_path / f"agg{seed}")
        _damage(db, "flips", seed)
        for args in (("status", str(db.parent)), ("token", str(db.parent))):
            done = _run(*args)
            assert "Traceback" not in done.stderr, (seed, args[0], done.stderr[-2000:])
            assert done.returncode in (0, 2), (seed, args[0], done.returncode)
            if done.returncode == 2:
                refused += 1
                assert "damaged" in _one_line_error(done.stderr) or "integrity" in done.stderr
    assert refused >= 6


@contextlib.contextmanager
def _full(mount: Path) -> Iterator[Path]:
    """Fill the file system at ``mount`` to the last byte for the block (the filler is removed after)."""
    filler = mount / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for size in (64 * 1024, 1024, 1):
            block = bytes(size)
            while True:
                try:
                    os.write(fd, block)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC
                    break
    finally:
        os.close(fd)
    try:
        yield filler
    finally:
        filler.unlink(missing_ok=True)


def test_a_full_disk_mid_round_is_retried_and_an_abort_on_a_full_disk_does_not_stop_the_aggregator(
    tmp_path: Path,
) -> None:
    """Finding 8: before, devices got ``INTERNAL 'internal error'`` (not retried), and an abort while the
    disk was full made the aggregator exit rc 2 with "lost the coordinator lease"."""
    with mounted_tmpfs(tmp_path / "disk", "12m") as mount:
        dep = Deployment(
            tmp_path / "agg", min_clients=4, max_clients=4, deadline_s=10, threshold=3, complete_graph=True,
            storage_url=f"sqlite://{mount / 'aggregator.db'}",
        )  # fmt: skip
        # A lease that outlasts the full disk: what is tested is that a full disk is not a lost lease.
        agg = dep.serve("--checkin-s", "1", "--lease-ttl-s", "60")
        try:
            devices = dep.enroll_devices(4, agg.enroll_port, tmp_path)
            updates, weights = random_updates(devices, seed=31)

            # Round 1: one device uploads its masked input while the disk is full; it retries until it is not.
            resume = tmp_path / "resume"
            late, *others = devices
            late.start(
                updates[late.device_id], weights[late.device_id], attempts=1,
                hostile=("--pause-after", "share_keys", "--resume-file", str(resume)),
            )  # fmt: skip
            for d in others:
                d.start(updates[d.device_id], weights[d.device_id], attempts=1)
            late.wait_for_line("paused")
            deadline = time.monotonic() + 30
            while dep.stored_messages(1, "masked_input") < 3:
                assert time.monotonic() < deadline, "the other masked inputs never arrived"
                time.sleep(0.1)
            with _full(mount):
                resume.touch()
                time.sleep(3.0)  # the upload is refused as retryable meanwhile
            first = [d.finish() for d in devices]
            late_log = late.stderr()

            # Round 2: two devices vanish after advertising; the round aborts while the disk is full.
            devices = [Device(d.state, d.device_id) for d in devices]  # new processes of the same devices
            stallers, rest = devices[:2], devices[2:]
            for d in stallers:
                d.start(updates[d.device_id], weights[d.device_id], stall_after="advertise_keys")
            for d in rest:
                d.start(updates[d.device_id], weights[d.device_id], attempts=1)
            for d in stallers:
                d.wait_for_line("stalled")
            with _full(mount):
                deadline = time.monotonic() + 30
                while "round 2 aborted" not in agg.log():
                    assert time.monotonic() < deadline, "round 2 never aborted"
                    time.sleep(0.2)
                time.sleep(2.0)  # the abort and the next round cannot be written yet
                alive_while_full = agg.proc.poll() is None
            for d in stallers:
                d.kill()
            second = [d.finish() for d in rest]

            # Round 3, with space again: it runs and publishes.
            devices = [Device(d.state, d.device_id) for d in devices]
            for d in devices:
                d.start(updates[d.device_id], weights[d.device_id], attempts=2)
            third = [d.finish() for d in devices]
            alive = agg.proc.poll() is None
        finally:
            agg.kill()
        statuses = dep.round_statuses()
    for code, lines, err in first:
        assert code == 0, err[-1500:]
        assert [line["status"] for line in lines if "status" in line] == ["published"]
    assert "masked input: UNAVAILABLE, retry" in late_log
    log = agg.log()
    assert "request refused: the disk holding the SQLite database is full; nothing was written" in log
    assert all(code == 4 for code, _, _ in second)
    assert alive_while_full and alive
    assert "round 2: abort not recorded yet (storage unavailable)" in log
    assert "round 2: abort recorded" in log
    assert "lost the coordinator lease" not in log
    for code, lines, err in third:
        assert code == 0, err[-1500:]
        assert lines[-1]["status"] == "published"
    assert statuses[:3] == ["published", "aborted", "published"]
    assert "Traceback" not in log
