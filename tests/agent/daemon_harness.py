"""A real ``fedfer-agent run`` process for the daemon tests (real workers, real ZeroMQ, real OpenCV)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fedfer.agent.config import apply_path_overrides, load_config, parse_config
from fedfer.agent.daemon.control import ControlClient, ControlError
from fedfer.agent.records import FrameRecord
from fedfer.agent.store.device import open_cache

FAST_DAEMON = """
[daemon]
heartbeat_interval_s = 0.2
heartbeat_timeout_s = 5.0
start_timeout_s = 30.0
restart_backoff_s = 0.2
restart_backoff_max_s = 1.0
drain_timeout_s = 5.0
queue_hwm = 8
"""


def write_config(path: Path, *, clips: Path, extra: str = "", daemon: str = FAST_DAEMON) -> Path:
    """Write an agent config reading the real clips (10 fps in real time, looping) with quick heartbeats."""
    path.write_text(
        f'[capture]\nsource = "{clips}"\nfps = 10\nrealtime = true\nloop = true\n{extra}\n{daemon}',
        encoding="utf-8",
    )
    return path


class Agent:
    """One supervisor process and helpers to talk to it.

    ``env`` is applied on top of the inherited environment (from which ``FEDFER_*`` is stripped), e.g. to
    point ``HOME`` or ``FEDFER_CACHE_DIR`` into the test's temporary folder.
    """

    def __init__(
        self, tmp: Path, config: Path, *, name: str = "state", env: Mapping[str, str] | None = None
    ) -> None:
        self.state_dir = tmp / name
        self.config = config
        self.env = dict(env or {})
        self.log = tmp / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.client = ControlClient(self.state_dir, timeout_s=5.0)

    def start_paused(self) -> Agent:
        """Start with capture paused (as a previous run left it): no frames, so vision never loads models."""
        self.state_dir.mkdir(mode=0o700, exist_ok=True)
        (self.state_dir / "agent-state.json").write_text('{"paused": true}')
        return self.start()

    def start(self, *, wait: bool = True) -> Agent:
        """Start ``fedfer-agent run``; with ``wait``, until every worker has sent a heartbeat."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("FEDFER_")}
        default_assets = str(Path(__file__).resolve().parents[3] / "shared")
        env["FEDFER_ASSETS"] = os.environ.get("FEDFER_ASSETS", default_assets)
        env.update(self.env)
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "fedfer.agent.cli",
                    "run",
                    "--config",
                    str(self.config),
                    "--state-dir",
                    str(self.state_dir),
                ],
                stdout=log,
                stderr=log,
                env=env,
            )
        if wait:
            self.wait_for(lambda s: all(w["heartbeat_age_s"] is not None for w in s["workers"].values()))
        return self

    def status(self) -> dict[str, Any]:
        """The agent's status (JSON over the control socket)."""
        return self.client.request("status")

    def cli(self, *args: str, timeout: float = 60.0) -> str:
        """Run the real ``fedfer-agent`` command line (``status``, ``sessions``...) here; return its stdout.

        Fails the test when the command fails.
        """
        env = {k: v for k, v in os.environ.items() if not k.startswith("FEDFER_")}
        command = [str(Path(sys.executable).parent / "fedfer-agent"), *args]
        command += ["--config", str(self.config), "--state-dir", str(self.state_dir)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, check=False)
        assert done.returncode == 0, f"{' '.join(args)} exited {done.returncode}: {done.stderr[-2000:]}"
        return done.stdout

    def wait_for(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 30.0) -> dict[str, Any]:
        """Poll the status until ``predicate`` holds; fail with the last status otherwise."""
        deadline = time.monotonic() + timeout
        last: dict[str, Any] = {}
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"agent exited with {self.proc.returncode}: {self.log_text()[-2000:]}")
            try:
                last = self.status()
                if predicate(last):
                    return last
            except ControlError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"condition not reached; last status: {json.dumps(last)[:3000]}")

    def worker_pid(self, role: str) -> int:
        """The pid of the running worker ``role``."""
        pid = self.status()["workers"][role]["pid"]
        assert isinstance(pid, int)
        return pid

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the supervisor."""
        assert self.proc is not None
        self.proc.send_signal(signum)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM and wait; return the exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """Make sure the supervisor is gone (test teardown)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def log_text(self) -> str:
        """Everything the agent and its workers logged."""
        return self.log.read_text(encoding="utf-8", errors="replace") if self.log.exists() else ""


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            return fh.read().split(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def wait_gone(pid: int, timeout: float = 10.0) -> bool:
    """Wait until ``pid`` has exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.05)
    return False


def fill_cache(config_text: str, state_dir: Path, *, sessions: int, frames: int = 5) -> None:
    """Cached sessions whose IFER probabilities lean to class ``n % 3`` (random features: for plumbing).

    Written through the real encrypted cache of the agent configured by ``config_text`` at ``state_dir``.
    """
    config = apply_path_overrides(parse_config(config_text), {"FEDFER_STATE_DIR": str(state_dir)})
    cache = open_cache(config)
    try:
        for n in range(sessions):
            label = n % 3
            probs = np.full(6, 0.04, np.float32)
            probs[label] = 0.8
            sid = cache.begin_session()
            for i in range(frames):
                noise = np.frombuffer(os.urandom(2560), dtype=np.uint16).astype(np.float32) / 65535.0
                record = FrameRecord(
                    timestamp=i * 0.1,
                    feature=(noise + label).astype(np.float16),
                    ifer_probs=probs,
                    box=(0, 0, 9, 9),
                    score=0.9,
                )
                cache.append(sid, record)
            cache.end_session(sid)
    finally:
        cache.close()


def cached_features(agent: Agent) -> dict[str, list[bytes]]:
    """Every cached session's features (bytes), by session id, read through the agent's own cache and key."""
    config = apply_path_overrides(load_config(agent.config), {"FEDFER_STATE_DIR": str(agent.state_dir)})
    cache = open_cache(config)
    try:
        return {
            s.session_id: [r.feature.tobytes() for r in cache.read_session(s.session_id)]
            for s in cache.sessions()
        }
    finally:
        cache.close()
