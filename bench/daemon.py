"""The agent as a service: start-up, control-plane latency, pipeline throughput with counted drops, drain.

Runs a real ``fedfer-agent run`` (supervisor + capture, vision, learner processes) on the real clips, paced
in real time at ``--fps`` (as a camera would deliver them), and reports:

* ``ready_s``: start to every worker heartbeating; ``drain_s``: SIGTERM to exit (bound: ``drain_timeout_s``);
* control-plane ``status`` round trips (p50/p99 ms);
* frames/s read by capture vs processed by vision, records/s written to the encrypted cache, and the share
  of frames dropped at the bounded queue (capture never waits for vision: the ratio shows by how much the
  source outruns the models on this machine; ``--fast`` reads the files as fast as they decode).
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fedfer.agent.daemon.control import ControlClient, ControlError
from fedfer.agent.files import assets_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Benchmark options."""
    parser.add_argument(
        "--clips", type=Path, default=None, help="folder of videos (default: the CREMA-D sample)"
    )
    parser.add_argument("--seconds", type=float, default=20.0, help="how long to measure the pipeline")
    parser.add_argument("--fps", type=float, default=10.0, help="capture sampling rate")
    parser.add_argument("--fast", action="store_true", help="read files as fast as they decode")
    parser.add_argument("--requests", type=int, default=200, help="control round trips to time")


def _wait(client: ControlClient, predicate: Any, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            status = client.request("status")
            if predicate(status):
                return status
        except ControlError:
            pass
        time.sleep(0.05)
    raise TimeoutError("the agent did not reach the expected state")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark; returns the JSON-able result."""
    assets = assets_dir()
    clips = args.clips or assets / "data" / "crema-d-sample"
    with tempfile.TemporaryDirectory(prefix="fedfer-bench-daemon-") as tmp:
        root = Path(tmp)
        state = root / "state"
        state.mkdir(mode=0o700)
        (state / "agent-state.json").write_text('{"paused": true}')
        config = root / "agent.toml"
        config.write_text(
            f'[capture]\nsource = "{clips}"\nfps = {args.fps}\nloop = true\n'
            f"realtime = {'false' if args.fast else 'true'}\n"
            "[daemon]\nheartbeat_interval_s = 0.5\nheartbeat_timeout_s = 10\nqueue_hwm = 16\n"
        )
        env = {**os.environ, "FEDFER_ASSETS": str(assets)}
        started = time.monotonic()
        with (root / "agent.log").open("wb") as log:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "fedfer.agent.cli",
                    "run",
                    "--config",
                    str(config),
                    "--state-dir",
                    str(state),
                ],
                stdout=log,
                stderr=log,
                env=env,
            )
        client = ControlClient(state, timeout_s=10)
        try:
            _wait(client, lambda s: all(w["heartbeat_age_s"] is not None for w in s["workers"].values()), 60)
            ready_s = time.monotonic() - started
            latencies = []
            for _ in range(args.requests):
                t0 = time.perf_counter()
                client.request("status")
                latencies.append((time.perf_counter() - t0) * 1000)
            latencies.sort()

            client.request("resume")
            _wait(client, lambda s: s["workers"]["vision"]["state"] == "running", 120)
            first = client.request("status")["workers"]
            t0 = time.monotonic()
            time.sleep(args.seconds)
            last = client.request("status")["workers"]
            elapsed = time.monotonic() - t0

            def rate(role: str, key: str) -> float:
                return float(last[role]["stats"].get(key, 0) - first[role]["stats"].get(key, 0)) / elapsed

            read = rate("capture", "frames_read")
            dropped = rate("capture", "frames_dropped")
            pids = [w["pid"] for w in last.values()]
            t1 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(60)
            drain_s = time.monotonic() - t1
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    leftovers = sum(1 for pid in pids if Path(f"/proc/{pid}").exists())
    return {
        "ok": code == 0 and leftovers == 0,
        "ready_s": round(ready_s, 3),
        "control_status_ms_p50": round(statistics.median(latencies), 3),
        "control_status_ms_p99": round(latencies[int(0.99 * (len(latencies) - 1))], 3),
        "capture_fps": round(read, 2),
        "vision_fps": round(rate("vision", "frames_in"), 2),
        "faces_per_s": round(rate("vision", "faces"), 2),
        "records_cached_per_s": round(rate("learner", "records_cached"), 2),
        "dropped_fraction": round(dropped / read, 4) if read else 0.0,
        "capture_to_vision_ratio": round(read / max(rate("vision", "frames_in"), 1e-9), 2),
        "drain_s": round(drain_s, 3),
        "measured_s": round(elapsed, 2),
        "cpus": os.cpu_count(),
    }
