"""The supervisor with real worker processes: start/stop, kill -9, heartbeats, drops, SIGTERM, SIGHUP.

The first tests share one running agent fed the real clips through the real capture, vision (MediaPipe +
MobileNetV2) and encrypted cache, in order; the last of them stops it. The rest start agents of their own.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.control import ControlClient, ControlError
from tests.agent.daemon_harness import Agent, pid_alive, wait_gone, write_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def clips(assets: Path) -> Path:
    path = assets / "data" / "crema-d-sample"
    assert len(list(path.glob("*.flv"))) == 6
    return path


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory, clips: Path) -> Iterator[Agent]:
    tmp = tmp_path_factory.mktemp("supervisor")
    a = Agent(tmp, write_config(tmp / "agent.toml", clips=clips)).start()
    yield a
    a.kill()


def test_real_clips_flow_through_capture_vision_and_cache(agent: Agent) -> None:
    # Each worker's counters arrive with its own heartbeat: wait until both ends have reported.
    status = agent.wait_for(
        lambda s: (
            s["workers"]["learner"]["stats"].get("records_cached", 0) >= 5
            and s["workers"]["vision"]["stats"].get("faces", 0) >= 5
        ),
        timeout=90,
    )
    capture = status["workers"]["capture"]["stats"]
    assert capture["frames_read"] >= 5 and capture["frames_sent"] >= 5
    vision = status["workers"]["vision"]["stats"]
    assert vision["faces"] >= 5 and vision["sessions"] >= 1 and "unavailable" not in vision
    pids = [w["pid"] for w in status["workers"].values()]
    assert len(set(pids)) == 3 and os.getpid() not in pids
    assert (agent.state_dir.stat().st_mode & 0o777) == 0o700
    assert ((agent.state_dir / "run").stat().st_mode & 0o777) == 0o700
    sessions = agent.client.request("sessions")["sessions"]
    assert sessions and sum(s["frames"] for s in sessions) >= 5


@pytest.mark.parametrize("role", ["capture", "vision", "learner"])
def test_kill_9_of_a_worker_restarts_it(agent: Agent, role: str) -> None:
    before = agent.status()["workers"]
    old = before[role]["pid"]
    os.kill(old, signal.SIGKILL)
    status = agent.wait_for(
        lambda s: (
            s["workers"][role]["restarts"] > before[role]["restarts"]
            and s["workers"][role]["heartbeat_age_s"] is not None
        )
    )
    worker = status["workers"][role]
    assert worker["pid"] != old and pid_alive(worker["pid"])
    assert worker["last_exit"] == -signal.SIGKILL
    for other in status["workers"]:
        if other != role:
            assert status["workers"][other]["restarts"] == before[other]["restarts"]
    # The pipeline heals: frames reach (the new) vision again and records the cache.
    cached = status["workers"]["learner"]["stats"].get("records_cached", 0) if role != "learner" else 0
    agent.wait_for(lambda s: s["workers"]["learner"]["stats"].get("records_cached", 0) > cached, timeout=60)


def test_hung_worker_is_killed_and_capture_never_blocks(agent: Agent) -> None:
    before = agent.status()
    vision = before["workers"]["vision"]["pid"]
    dropped = before["drops"]["frames"]
    os.kill(vision, signal.SIGSTOP)  # alive but silent: its queue fills and its heartbeats stop
    try:
        status = agent.wait_for(lambda s: s["drops"]["frames"] > dropped, timeout=15)
        # Capture kept reading and heartbeating while vision was stuck.
        assert status["workers"]["capture"]["heartbeat_age_s"] < 1.5
        assert status["workers"]["capture"]["stats"]["frames_dropped"] > dropped
        restarts = before["workers"]["vision"]["restarts"]
        status = agent.wait_for(lambda s: s["workers"]["vision"]["restarts"] > restarts, timeout=20)
        assert status["workers"]["vision"]["pid"] != vision
    finally:
        if pid_alive(vision):
            os.kill(vision, signal.SIGCONT)
    assert wait_gone(vision)


def test_pause_and_resume_control_capture(agent: Agent) -> None:
    assert agent.client.request("pause") == {"paused": True}
    status = agent.wait_for(lambda s: s["workers"]["capture"]["state"] == "paused")
    read = status["workers"]["capture"]["stats"]["frames_read"]
    time.sleep(0.6)
    assert agent.status()["workers"]["capture"]["stats"]["frames_read"] == read
    assert json.loads((agent.state_dir / "agent-state.json").read_text()) == {"paused": True}
    assert agent.client.request("resume") == {"paused": False}
    agent.wait_for(lambda s: s["workers"]["capture"]["stats"]["frames_read"] > read)


def test_sighup_reload_good_then_bad(agent: Agent) -> None:
    generation = agent.status()["config_generation"]
    agent.config.write_text(agent.config.read_text().replace("fps = 10", "fps = 12"))
    agent.signal(signal.SIGHUP)
    status = agent.wait_for(
        lambda s: (
            s["config_generation"] == generation + 1
            and all(w["heartbeat_age_s"] is not None for w in s["workers"].values())
        )
    )
    assert status["capture"]["fps"] == 12
    digest = status["config_digest"]
    agent.config.write_text(agent.config.read_text().replace("fps = 12", "fps = 600"))
    agent.signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "reload refused" not in agent.log_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "capture.fps must be a number in (0, 60]" in agent.log_text()
    status = agent.status()
    assert status["config_generation"] == generation + 1 and status["config_digest"] == digest
    assert status["capture"]["fps"] == 12
    agent.config.write_text(agent.config.read_text().replace("fps = 600", "fps = 12"))


def test_second_agent_on_same_state_dir_is_refused(agent: Agent) -> None:
    second = Agent(agent.state_dir.parent, agent.config, name="state")
    second.log = agent.state_dir.parent / "second.log"
    second.start(wait=False)
    assert second.proc is not None
    assert second.proc.wait(30) == 2
    assert "another fedfer agent" in second.log_text() and "already running" in second.log_text()
    assert agent.status()["pid"] == agent.proc.pid  # type: ignore[union-attr]


def test_sigterm_drains_within_the_bound(agent: Agent) -> None:
    pids = [w["pid"] for w in agent.status()["workers"].values()]
    started = time.monotonic()
    agent.signal(signal.SIGTERM)
    assert agent.stop(timeout=15) == 0
    assert time.monotonic() - started < 5.0 + 1.5  # drain_timeout_s plus process teardown
    assert all(wait_gone(pid, 2) for pid in pids)
    assert not (agent.state_dir / "run" / "control.ipc").exists()
    # Every process logged JSON lines only, native libraries' own stderr output included.
    lines = [json.loads(line) for line in agent.log_text().splitlines() if line.strip()]
    assert any(line["msg"] == "agent stopped" and line["role"] == "supervisor" for line in lines)
    assert {line["role"] for line in lines} == {"supervisor", "capture", "vision", "learner"}
    assert any(line["logger"] == "native" and line["role"] == "vision" for line in lines)
    with pytest.raises(ControlError, match="no fedfer agent is running"):
        agent.client.request("status")


# ----------------------------------------------------------------------------- agents of their own


def test_sigterm_bound_holds_when_a_worker_ignores_it(tmp_path: Path, clips: Path) -> None:
    agent = Agent(tmp_path, write_config(tmp_path / "agent.toml", clips=clips)).start_paused()
    try:
        learner = agent.worker_pid("learner")
        os.kill(learner, signal.SIGSTOP)  # a stuck worker cannot drain: the supervisor kills it at the bound
        started = time.monotonic()
        agent.signal(signal.SIGTERM)
        assert agent.stop(timeout=15) == 0
        assert time.monotonic() - started < 5.0 + 1.5
        assert wait_gone(learner, 2)
        assert "did not drain in time" in agent.log_text()
    finally:
        agent.kill()


def test_crash_loop_backs_off_then_gives_up(tmp_path: Path, clips: Path) -> None:
    # A folder without videos is a configuration error that ends the capture worker (a source that fails
    # while running, such as a vanished file, is retried inside the worker instead).
    empty = tmp_path / "no-videos"
    empty.mkdir()
    config = write_config(tmp_path / "agent.toml", clips=clips)
    text = config.read_text().replace(f'source = "{clips}"', f'source = "{empty}"')
    config.write_text(text + "crash_loop_limit = 3\ncrash_loop_window_s = 60\n")
    agent = Agent(tmp_path, config).start(wait=False)
    try:
        status = agent.wait_for(lambda s: s["workers"]["capture"]["state"] == "failed", timeout=45)
        assert status["workers"]["capture"]["restarts"] == 3
        assert status["workers"]["capture"]["last_exit"] == 3
        # The rest of the agent keeps running.
        assert status["workers"]["vision"]["pid"] is not None
        log = agent.log_text()
        backoffs = [json.loads(x)["backoff_s"] for x in log.splitlines() if "worker exited; restarting" in x]
        assert backoffs[:3] == [0.2, 0.4, 0.8]
        assert "crash-looping" in log
        # The source comes back (here: a video appears); `resume` gives the failed capture a fresh start.
        (empty / "clip.flv").symlink_to(next(clips.glob("*.flv")))
        agent.client.request("resume")
        status = agent.wait_for(lambda s: s["workers"]["capture"]["stats"].get("frames_read", 0) > 0)
        assert status["workers"]["capture"]["state"] != "failed"
    finally:
        agent.kill()


def test_kill_9_of_supervisor_then_restart_keeps_state(tmp_path: Path, clips: Path) -> None:
    agent = Agent(tmp_path, write_config(tmp_path / "agent.toml", clips=clips)).start_paused()
    try:
        # Paused capture sends nothing, so vision waits without loading its models.
        status = agent.wait_for(lambda s: s["workers"]["vision"]["state"] == "waiting")
        assert status["paused"] is True
        pids = [w["pid"] for w in status["workers"].values()]
        assert agent.proc is not None
        agent.proc.kill()
        agent.proc.wait(5)
        # Orphaned workers notice and exit; nothing is left holding the camera or the sockets.
        assert all(wait_gone(pid) for pid in pids)
        again = Agent(tmp_path, agent.config).start()
        try:
            status = again.wait_for(lambda s: s["workers"]["capture"]["state"] == "paused")
            assert status["paused"] is True and status["pid"] != agent.proc.pid
        finally:
            again.kill()
    finally:
        agent.kill()


def test_no_agent_running_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ControlError, match="no fedfer agent is running"):
        ControlClient(tmp_path / "nothing").request("status")
