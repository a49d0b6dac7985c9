"""The running agent on a full disk: it keeps running, says so, keeps what it stored, and catches up.

The state directory is on a small tmpfs that the test fills up while the agent reads real clips (a finite
file source). What happens: the learner refuses each record the disk cannot take (counted in
``records_disk_full`` and under ``drops`` in ``status``; a warning in the log), no worker crashes or
restarts, and the control plane answers. The files are not marked done, so once space is back the next
start reads them again: the cache ends with every face frame exactly once, as on a disk that never
filled. ``resume`` works on the full disk but its flag cannot be saved (the reply says ``"saved":
false``), so the next start is paused again.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedfer.agent.daemon.control import ControlClient
from tests.agent.daemon_harness import Agent
from tests.agent.small_disk import mounted_tmpfs
from tests.agent.test_daemon_files import CLIPS, DAEMON, _cached, _clips, _config, _done, _reference


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 32 MiB tmpfs for the agent's state directory."""
    with mounted_tmpfs(tmp_path / "disk", "32m") as mount:
        yield mount


def _fill(path: Path) -> None:
    """Write ``path`` until the file system has no byte left."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        for size in (1 << 16, 4096, 512, 1):
            while True:
                try:
                    os.write(fd, b"\0" * size)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC
                    break
    finally:
        os.close(fd)


@pytest.mark.slow
def test_a_full_disk_stops_caching_not_the_agent_and_nothing_is_lost_once_space_is_back(
    tmp_path: Path, assets: Path, small_disk: Path
) -> None:
    clips = _clips(tmp_path, assets)
    config_path = tmp_path / "agent.toml"
    config_path.write_text(DAEMON.format(clips=clips, realtime="false"))
    agent = Agent(tmp_path, config_path)  # its log stays off the small disk
    agent.state_dir = small_disk / "state"
    agent.client = ControlClient(agent.state_dir, timeout_s=5.0)
    config = _config(config_path.read_text(), agent.state_dir, assets)
    filler = small_disk / "filler"
    try:
        agent.start_paused()  # the learner has opened the cache (and its space reserve) on the small disk
        _fill(filler)
        # Resuming works on the full disk; the flag cannot be saved, so it holds until the next start.
        assert agent.client.request("resume") == {"paused": False, "saved": False}
        status = agent.wait_for(
            lambda s: (
                s["workers"]["capture"]["stats"].get("source_done") is True
                and s["workers"]["learner"]["stats"]["records_in"]
                >= s["workers"]["vision"]["stats"]["records_sent"]
                > 0
            ),
            timeout=240,
        )
        learner = status["workers"]["learner"]
        assert learner["stats"]["records_disk_full"] > 0 and learner["stats"]["disk_full"] is True
        assert status["drops"]["disk_full"] == learner["stats"]["records_disk_full"]
        assert all(w["restarts"] == 0 for w in status["workers"].values()), status["workers"]
        assert _done(agent.state_dir) < len(CLIPS)  # not every file was stored whole, so none is skipped
        assert isinstance(agent.client.request("sessions")["sessions"], list)  # the control plane answers
        log = agent.log_text()
        assert "disk full: records are not cached until there is space" in log
        assert "Traceback" not in log
        assert agent.stop() == 0

        filler.unlink()  # space is back
        agent.start()
        assert agent.status()["paused"] is True  # the resume above could not be saved
        assert agent.client.request("resume") == {"paused": False}
        status = agent.wait_for(
            lambda s: (
                _done(agent.state_dir) == len(CLIPS) and s["workers"]["capture"]["stats"]["source_done"]
            ),
            timeout=240,
        )
        assert status["drops"] == {"frames": 0, "records": 0, "disk_full": 0}
        assert agent.stop() == 0
        assert _cached(config) == _reference(config, clips)  # every face frame once: nothing lost or doubled
    finally:
        agent.kill()
