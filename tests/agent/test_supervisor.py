"""The supervisor with real worker processes: start/stop, kill -9, heartbeats, drops, SIGTERM, SIGHUP.

The first tests share one running agent fed the real clips through the real capture, vision (MediaPipe +
MobileNetV2) and encrypted cache, in order; the last of them stops it. The rest start agents of their own.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from fedfer.agent.config import apply_path_overrides, parse_config
from fedfer.agent.daemon.control import ControlClient, ControlError
from fedfer.agent.records import FrameRecord
from fedfer.agent.store.device import open_cache
from tests.agent.daemon_harness import (
    FAST_DAEMON,
    Agent,
    cached_features,
    pid_alive,
    wait_gone,
    write_config,
)

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


def _children(pid: int) -> list[int]:
    out = subprocess.run(
        ["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True, check=False
    )
    return [int(p) for p in out.stdout.split()]


def _fill_cache(agent: Agent) -> dict[str, list[bytes]]:
    """Two sealed sessions in the agent's cache; their features, by session id."""
    config = apply_path_overrides(parse_config(""), {"FEDFER_STATE_DIR": str(agent.state_dir)})
    agent.state_dir.mkdir(mode=0o700, exist_ok=True)
    cache = open_cache(config)
    stored = {}
    try:
        for n in range(2):
            sid = cache.begin_session()
            records = [
                FrameRecord(
                    timestamp=i * 0.2,
                    feature=(np.frombuffer(os.urandom(2560), dtype=np.uint16) / 6553.5).astype(np.float16),
                    ifer_probs=np.full(6, 1 / 6, np.float32),
                    box=(0.0, 0.0, 9.0, 9.0),
                    score=0.9,
                )
                for i in range(3 + n)
            ]
            cache.append_batch(sid, records)
            cache.end_session(sid)
            stored[sid] = [r.feature.tobytes() for r in records]
    finally:
        cache.close()
    return stored


def test_kill_9_of_supervisor_then_immediate_restart_waits_for_its_workers_and_keeps_state(
    tmp_path: Path, clips: Path
) -> None:
    agent = Agent(tmp_path, write_config(tmp_path / "agent.toml", clips=clips))
    stored = _fill_cache(agent)
    agent.start_paused()
    again = impatient = None
    try:
        # Paused capture sends nothing, so vision waits without loading its models.
        status = agent.wait_for(lambda s: s["workers"]["vision"]["state"] == "waiting")
        assert status["paused"] is True
        old = {role: w["pid"] for role, w in status["workers"].items()}
        os.kill(old["learner"], signal.SIGSTOP)  # a worker that cannot exit yet (it still holds the lock)
        assert agent.proc is not None
        agent.proc.kill()
        agent.proc.wait(5)
        # The other orphaned workers notice and exit; nothing is left holding the camera.
        assert wait_gone(old["capture"]) and wait_gone(old["vision"]) and pid_alive(old["learner"])

        # A supervisor started now finds the lock held by the dead agent's worker: it waits instead of
        # starting a second set of workers (with a tiny drain bound it gives up, clearly).
        short = write_config(
            tmp_path / "short.toml",
            clips=clips,
            daemon=FAST_DAEMON.replace("drain_timeout_s = 5.0", "drain_timeout_s = 0.5"),
        )
        impatient = Agent(tmp_path, short)
        impatient.log = tmp_path / "impatient.log"
        impatient.start(wait=False)
        assert impatient.proc is not None and impatient.proc.wait(30) == 2
        assert "worker processes of a fedfer agent that stopped" in impatient.log_text()
        assert "still hold state directory" in impatient.log_text()

        again = Agent(tmp_path, agent.config)
        again.log = tmp_path / "again.log"
        again.start(wait=False)
        assert again.proc is not None
        time.sleep(1.5)
        assert again.proc.poll() is None and _children(again.proc.pid) == []
        assert "agent started" not in again.log_text()
        os.kill(old["learner"], signal.SIGCONT)  # it drains (its SIGTERM was pending) and exits
        assert wait_gone(old["learner"])
        status = again.wait_for(
            lambda s: (
                all(w["heartbeat_age_s"] is not None for w in s["workers"].values())
                and s["workers"]["capture"]["state"] == "paused"
            )
        )
        assert status["paused"] is True and status["pid"] != agent.proc.pid
        assert not {w["pid"] for w in status["workers"].values()} & set(old.values())
        # The cache survived both kills: the same sessions, every record readable and unchanged.
        assert again.client.request("sessions")["sessions"] and cached_features(again) == stored
    finally:
        for a in (again, impatient, agent):
            if a is not None:
                a.kill()
        with contextlib.suppress(ProcessLookupError):
            os.kill(old["learner"], signal.SIGCONT)


def test_sigterm_during_a_reload_keeps_one_bound_and_starts_no_worker(tmp_path: Path, clips: Path) -> None:
    agent = Agent(tmp_path, write_config(tmp_path / "agent.toml", clips=clips)).start_paused()
    try:
        learner = agent.worker_pid("learner")
        os.kill(learner, signal.SIGSTOP)  # the reload's stop waits for it up to the drain bound (5 s)
        agent.config.write_text(agent.config.read_text().replace("fps = 10", "fps = 11"))
        agent.signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "config reloaded; restarting workers" not in agent.log_text():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.5)
        started = time.monotonic()
        agent.signal(signal.SIGTERM)
        assert agent.stop(timeout=15) == 0
        assert time.monotonic() - started < 5.0 + 1.0  # one drain bound from the SIGTERM, not two
        assert wait_gone(learner, 2)
        lines = [json.loads(x) for x in agent.log_text().splitlines() if x.startswith("{")]
        reload_at = next(i for i, x in enumerate(lines) if x["msg"] == "config reloaded; restarting workers")
        assert not [x for x in lines[reload_at:] if x["msg"] == "worker started"]
        assert any(x["msg"] == "agent stopped" for x in lines[reload_at:])
    finally:
        agent.kill()


def test_reload_applies_the_supervisors_log_level_and_control_size_cap(tmp_path: Path, clips: Path) -> None:
    config = write_config(tmp_path / "agent.toml", clips=clips, extra='[agent]\nlog_level = "warning"\n')
    agent = Agent(tmp_path, config).start_paused()
    try:
        # 300 kB is beyond the transport cap of the default limit (4 x 64 KiB): the connection is dropped.
        big = json.dumps({"v": 1, "cmd": "status", "args": {}, "pad": "x" * 300_000}).encode()
        with pytest.raises(ControlError, match="did not answer"):
            ControlClient(agent.state_dir, timeout_s=2.0).request_raw(big)
        agent.status()
        assert '"msg": "control request"' not in agent.log_text()
        config.write_text(
            config.read_text().replace('log_level = "warning"', 'log_level = "debug"')
            + "control_max_bytes = 1048576\n"
        )
        agent.signal(signal.SIGHUP)
        agent.wait_for(lambda s: s["config_generation"] == 2)
        # Now it is read, checked, and answered with a clear error; and the supervisor logs at debug level.
        with pytest.raises(ControlError, match="unknown request field"):
            ControlClient(agent.state_dir, timeout_s=5.0).request_raw(big)
        agent.status()
        lines = [json.loads(x) for x in agent.log_text().splitlines() if x.startswith("{")]
        assert any(x["msg"] == "control request" and x["role"] == "supervisor" for x in lines)
    finally:
        agent.kill()


def test_live_source_under_load_counts_both_drops_and_sigterm_stores_what_was_queued(
    tmp_path: Path, clips: Path
) -> None:
    daemon = FAST_DAEMON.replace("queue_hwm = 8", "queue_hwm = 2").replace(
        "heartbeat_timeout_s = 5.0", "heartbeat_timeout_s = 60.0"
    )
    config = write_config(tmp_path / "agent.toml", clips=clips, daemon=daemon)
    config.write_text(
        config.read_text().replace("realtime = true", "realtime = false")
    )  # as fast as it reads
    agent = Agent(tmp_path, config).start()
    try:
        agent.wait_for(lambda s: s["workers"]["learner"]["stats"].get("records_cached", 0) >= 3, timeout=120)
        # Capture outruns vision: a live source drops frames (counted) and never waits.
        agent.wait_for(lambda s: s["drops"]["frames"] > 0)
        # A learner that stops reading: vision waits a bounded time per record, then drops it (counted).
        learner = agent.worker_pid("learner")
        os.kill(learner, signal.SIGSTOP)
        try:
            status = agent.wait_for(lambda s: s["drops"]["records"] > 0, timeout=60)
        finally:
            os.kill(learner, signal.SIGCONT)
        vision = status["workers"]["vision"]
        assert (
            vision["stats"]["records_dropped"] == status["drops"]["records"] and vision["heartbeat_age_s"] < 2
        )
        cached = agent.status()["workers"]["learner"]["stats"]["records_cached"]
        agent.wait_for(lambda s: s["workers"]["learner"]["stats"]["records_cached"] > cached)

        # SIGTERM with full queues: every frame capture had queued reaches vision and every record vision
        # sent reaches the encrypted cache, within the bound.
        assert agent.status()["workers"]["learner"]["restarts"] == 0
        started = time.monotonic()
        agent.signal(signal.SIGTERM)
        assert agent.stop(timeout=15) == 0
        assert time.monotonic() - started < 5.0 + 1.5
        lines = [json.loads(x) for x in agent.log_text().splitlines() if x.startswith("{")]
        final = next(x for x in lines if x["msg"] == "agent stopped")
        assert final["capture_sent"] > 0 and final["vision_received"] == final["capture_sent"], final
        assert final["vision_unprocessed"] == 0 and final["vision_discarded"] == 0, final
        assert final["records_in"] == final["records_sent"] and final["records_unstored"] == 0, final
        assert final["records_cached"] == final["records_in"], final
        assert sum(len(v) for v in cached_features(agent).values()) == final["records_cached"]
    finally:
        agent.kill()


def test_no_agent_running_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ControlError, match="no fedfer agent is running"):
        ControlClient(tmp_path / "nothing").request("status")


def test_a_worker_whose_supervisor_died_before_it_started_exits_at_once(tmp_path: Path) -> None:
    """A worker (re)started just before its supervisor is killed would outlive it: a parent-death signal
    armed after the parent died never fires, and its parent is init by then."""
    import sys

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait(10)  # a pid that is not this worker's parent
    run = [
        sys.executable,
        "-m",
        "fedfer.agent.daemon.workers",
        "--role",
        "learner",
        "--run-dir",
        str(tmp_path),
    ]
    proc = subprocess.run([*run, "--supervisor-pid", str(gone.pid)], capture_output=True, timeout=60)
    assert proc.returncode == 1
    # With its real parent's pid it goes on (here to read the missing run configuration, a clear error).
    own = subprocess.run(
        [*run, "--supervisor-pid", str(os.getpid())], capture_output=True, text=True, timeout=60
    )
    assert own.returncode != 0 and "config" in own.stderr.lower()
