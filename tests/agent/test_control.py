"""The control plane: request schema, malformed requests against a live agent, socket permissions, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq

from fedfer.agent.daemon.control import ControlClient, ControlError, parse_request
from fedfer.agent.daemon.lock import AgentLockedError, StateDirLock
from fedfer.agent.files import InsecurePathError, ensure_private_dir
from tests.agent.daemon_harness import Agent, write_config


def _req(obj: object) -> list[bytes]:
    return [json.dumps(obj).encode()]


def test_parse_request_accepts_the_schema() -> None:
    assert parse_request(_req({"v": 1, "cmd": "status"}), max_bytes=1024).cmd == "status"
    forget = parse_request(_req({"v": 1, "cmd": "forget", "args": {"id": "abc-123"}}), max_bytes=1024)
    assert forget.args == {"id": "abc-123"}
    purge = parse_request(_req({"v": 1, "cmd": "purge", "args": {"confirm": True}}), max_bytes=1024)
    assert purge.args == {"confirm": True}


@pytest.mark.parametrize(
    ("frames", "message"),
    [
        ([b"not json"], "not UTF-8 JSON"),
        ([b"\xff\xfe"], "not UTF-8 JSON"),
        (_req([1, 2]), "must be a JSON object"),
        (_req({"v": 2, "cmd": "status"}), "v must be 1"),
        (_req({"v": True, "cmd": "status"}), "v must be 1"),
        (_req({"v": 1, "cmd": "rm -rf"}), "unknown command"),
        (_req({"v": 1, "cmd": "status", "extra": 1}), "unknown request field"),
        (_req({"v": 1, "cmd": "status", "args": []}), "args must be an object"),
        (_req({"v": 1, "cmd": "status", "args": {"x": 1}}), "unexpected argument"),
        (_req({"v": 1, "cmd": "forget", "args": {}}), "exactly one argument"),
        (_req({"v": 1, "cmd": "forget", "args": {"id": "../../etc"}}), "session id"),
        (_req({"v": 1, "cmd": "forget", "args": {"id": 7}}), "session id"),
        (_req({"v": 1, "cmd": "purge", "args": {"confirm": 1}}), "confirm=true"),
        ([b"{}", b"{}"], "exactly one message frame"),
        ([b" " * 2000], "larger than 1024"),
    ],
)
def test_parse_request_rejects_malformed(frames: list[bytes], message: str) -> None:
    with pytest.raises(ControlError, match=message):
        parse_request(frames, max_bytes=1024)


def test_private_dir_checks(tmp_path: Path) -> None:
    private = ensure_private_dir(tmp_path / "a" / "b")
    assert private.stat().st_mode & 0o777 == 0o700
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o755)
    loose.chmod(0o755)
    with pytest.raises(InsecurePathError, match="chmod 700"):
        ensure_private_dir(loose)
    link = tmp_path / "link"
    link.symlink_to(private)
    with pytest.raises(InsecurePathError, match="symlink"):
        ensure_private_dir(link)


def test_state_lock_refuses_a_second_holder(tmp_path: Path) -> None:
    ensure_private_dir(tmp_path / "s")
    with StateDirLock(tmp_path / "s"), pytest.raises(AgentLockedError, match=f"pid {os.getpid()}"):
        StateDirLock(tmp_path / "s").acquire()
    StateDirLock(tmp_path / "s").acquire()  # released on exit


def test_state_lock_is_shared_with_children_and_waits_only_for_a_dead_agents_workers(tmp_path: Path) -> None:
    state = ensure_private_dir(tmp_path / "s")
    lock = StateDirLock(state)
    lock.acquire()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(2)"], pass_fds=(lock.fileno(),))
    try:
        lock.release()  # this process lets go; the child (a worker) still holds the lock
        # The recorded holder (this process) runs: a second agent is refused at once, whatever it may wait.
        started = time.monotonic()
        with pytest.raises(AgentLockedError, match="already running"):
            StateDirLock(state).acquire(wait_s=5)
        assert time.monotonic() - started < 1
        # The recorded holder is gone (a supervisor killed with kill -9): its orphaned worker is waited for.
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        (state / "agent.lock").write_text(f"{dead.pid}\n")
        with pytest.raises(AgentLockedError, match="still hold state directory"):
            StateDirLock(state).acquire(wait_s=0.2)
        assert child.poll() is None
        StateDirLock(state).acquire(wait_s=30)
        assert child.poll() is not None  # taken only once the last holder exited
    finally:
        child.kill()
        child.wait()


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, assets: Path):  # type: ignore[no-untyped-def]
    tmp = tmp_path_factory.mktemp("control")
    config = write_config(
        tmp / "agent.toml",
        clips=assets / "data" / "crema-d-sample",
        extra="",
        daemon="[daemon]\nheartbeat_interval_s = 0.2\nheartbeat_timeout_s = 3.0\ncontrol_max_bytes = 1024\n",
    )
    agent = Agent(tmp, config).start_paused()
    yield agent
    agent.kill()


def _raw(agent: Agent, *frames: bytes) -> dict[str, object]:
    sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(f"ipc://{agent.state_dir / 'run' / 'control.ipc'}")
        sock.send_multipart(list(frames))
        assert sock.poll(5000), "the agent did not answer"
        reply = json.loads(sock.recv())
    finally:
        sock.close()
    assert isinstance(reply, dict)
    return reply


@pytest.mark.slow
def test_malformed_requests_get_errors_and_the_agent_survives(live: Agent) -> None:
    pid = live.status()["pid"]
    cases = [
        (b"garbage",),
        (b"\x00\xff" * 10,),
        (json.dumps({"v": 1, "cmd": "shutdown"}).encode(),),
        (json.dumps({"v": 1, "cmd": "status", "args": {"all": True}}).encode(),),
        (json.dumps({"v": 1, "cmd": "forget", "args": {"id": "x" * 500}}).encode(),),
        (b"{}", b"{}"),
        (b"[" * 3000,),  # over control_max_bytes but under the transport cap
        (json.dumps({"v": 1, "cmd": "purge"}).encode(),),
    ]
    for frames in cases:
        reply = _raw(live, *frames)
        assert reply["ok"] is False and isinstance(reply["error"], str) and reply["error"]
    assert live.status()["pid"] == pid
    assert live.proc is not None and live.proc.poll() is None


@pytest.mark.slow
def test_control_socket_is_private(live: Agent) -> None:
    run = live.state_dir / "run"
    assert run.stat().st_mode & 0o777 == 0o700
    assert (run / "control.ipc").stat().st_mode & 0o777 == 0o600
    run.chmod(0o755)
    try:
        with pytest.raises(InsecurePathError):
            ControlClient(live.state_dir).request("status")
    finally:
        run.chmod(0o700)
    assert live.status()["pid"] == live.proc.pid  # type: ignore[union-attr]


@pytest.mark.slow
def test_cli_status_human_and_json(live: Agent) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDFER_")}
    base = [sys.executable, "-m", "fedfer.agent.cli"]
    human = subprocess.run(
        [*base, "status", "--state-dir", str(live.state_dir)],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    assert human.returncode == 0, human.stderr
    assert "fedfer agent pid" in human.stdout and "capture" in human.stdout and "learner" in human.stdout
    machine = subprocess.run(
        [*base, "status", "--json", "--state-dir", str(live.state_dir)],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    assert json.loads(machine.stdout)["pid"] == live.proc.pid  # type: ignore[union-attr]
    refused = subprocess.run(
        [*base, "purge", "--state-dir", str(live.state_dir)],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    assert refused.returncode == 2 and "--yes" in refused.stderr
    bad_id = subprocess.run(
        [*base, "forget", "../x", "--state-dir", str(live.state_dir)],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    assert bad_id.returncode == 2 and "session id" in bad_id.stderr


def test_cli_without_agent_fails_clearly(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDFER_")}
    out = subprocess.run(
        [sys.executable, "-m", "fedfer.agent.cli", "status", "--state-dir", str(tmp_path / "none")],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    assert out.returncode == 2 and "no fedfer agent is running" in out.stderr


def test_supervisor_refuses_a_state_dir_others_can_reach(tmp_path: Path) -> None:
    from fedfer.agent.config import AgentConfig, apply_path_overrides
    from fedfer.agent.daemon.supervisor import Supervisor

    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    state.chmod(0o755)
    config = apply_path_overrides(AgentConfig(), {"FEDFER_STATE_DIR": str(state)})
    with pytest.raises(InsecurePathError, match="chmod 700"):
        Supervisor(config=config).run()
    assert not (state / "run").exists() and not (state / "agent.lock").exists()
