"""Jobs run by the learner worker: personalize with DP on the encrypted cache, then budget refusal."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedfer.agent.config import apply_path_overrides, parse_config
from fedfer.agent.daemon.control import ControlError
from fedfer.agent.records import FrameRecord
from fedfer.agent.store.device import load_personal_model, open_cache
from tests.agent.daemon_harness import Agent, write_config

pytestmark = pytest.mark.slow

JOB_SETTINGS = """
[learning]
min_sessions = 4
epochs = 1
allow_untrained_ifer = true  # synthetic cached sessions: the job plumbing is under test
[privacy]
dp = true
target_epsilon = 1.0
budget = 1.0
"""


def _clip(label: int, frames: int) -> list[FrameRecord]:
    """A clip whose IFER probabilities lean to ``label`` (random features: the plumbing is under test)."""
    probs = np.full(6, 0.04, np.float32)
    probs[label] = 0.8
    out = []
    for i in range(frames):
        noise = np.frombuffer(os.urandom(1280 * 2), dtype=np.uint16).astype(np.float32) / 65535.0
        out.append(
            FrameRecord(
                timestamp=i * 0.1,
                feature=(noise + label).astype(np.float16),
                ifer_probs=probs,
                box=(0.0, 0.0, 10.0, 10.0),
                score=0.9,
            )
        )
    return out


def _cli_wait(agent: Agent, command: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDFER_")}
    return subprocess.run(
        [sys.executable, "-m", "fedfer.agent.cli", command, "--wait", "--state-dir", str(agent.state_dir)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_personalize_job_trains_v_with_dp_and_the_budget_then_refuses(tmp_path: Path, assets: Path) -> None:
    config_path = write_config(tmp_path / "agent.toml", clips=assets / "data" / "crema-d-sample", extra="")
    config_path.write_text(config_path.read_text() + JOB_SETTINGS)
    agent = Agent(tmp_path, config_path)
    agent.state_dir.mkdir(mode=0o700)
    config = apply_path_overrides(
        parse_config(config_path.read_text()), {"FEDFER_STATE_DIR": str(agent.state_dir)}
    )
    cache = open_cache(config)
    for n in range(12):
        sid = cache.begin_session()
        cache.append_batch(sid, _clip(n % 3, 6))
        cache.end_session(sid)
    cache.close()
    try:
        agent.start_paused()
        with pytest.raises(ControlError, match="unknown command"):
            agent.client.request("train")
        started = agent.client.request("personalize")
        assert started["state"] == "running"
        with pytest.raises(ControlError, match="another job is running"):
            agent.client.request("personalize")
        status = agent.wait_for(lambda s: s["jobs"][-1]["state"] != "running", timeout=120)
        job = status["jobs"][-1]
        assert job["state"] == "done", job
        result = job["result"]
        assert result["sessions"] == 12 and result["selected"] == 12
        assert result["per_class"][:3] == [4, 4, 4]
        assert result["dp"] is True and 0 < result["epsilon"] <= 1.0 + 1e-6
        # The personalized v is kept only in the encrypted cache, never as a plain file.
        stored = load_personal_model(config)
        assert stored is not None
        arrays, meta = stored
        assert meta["base_version"] == "initial" and meta["kind"] == "v"
        assert sum(a.size for a in arrays.values()) == meta["parameters"] > 0
        assert not list(agent.state_dir.rglob("personal*"))
        budget = json.loads((agent.state_dir / "privacy-budget.json").read_text())
        assert budget["epsilon_limit"] == 1.0 and budget["history"]

        out = _cli_wait(agent, "personalize")  # the command line, waiting for the job
        assert out.returncode == 1, out.stderr
        assert out.stdout.startswith("personalize failed:") and "budget" in out.stdout
        status = agent.status()
        assert status["jobs"][-1]["state"] == "failed" and "budget" in status["jobs"][-1]["error"]
        assert status["workers"]["learner"]["restarts"] == 0  # a failed job never takes the worker down
    finally:
        agent.kill()


def test_jobs_refuse_an_untrained_ifer_head_then_join_needs_federation_config_and_enrollment(
    tmp_path: Path, assets: Path
) -> None:
    config = write_config(tmp_path / "agent.toml", clips=assets / "data" / "crema-d-sample")
    agent = Agent(tmp_path, config).start_paused()
    try:
        # No IFER export or head configured: g is untrained. The agent says so once at start and in status,
        # and both jobs fail with the reason and the way out in the job result.
        status = agent.status()
        assert [w for w in status["warnings"] if "IFER head g is untrained" in w and "refused" in w]
        lines = [json.loads(x) for x in agent.log_text().splitlines() if x.startswith("{")]
        warned = [x for x in lines if x["role"] == "supervisor" and "IFER head g is untrained" in x["msg"]]
        assert len(warned) == 1 and warned[0]["level"] == "warning"
        for command in ("personalize", "join"):
            out = _cli_wait(agent, command)
            assert out.returncode == 1, out.stderr
            assert out.stdout.startswith(f"{command} failed: the IFER head g is untrained"), out.stdout
            assert "allow_untrained_ifer" in out.stdout and "fedfer-agent provision" in out.stdout
        jobs = agent.status()["jobs"]
        assert [(j["kind"], j["state"]) for j in jobs] == [("personalize", "failed"), ("join", "failed")]
        assert all("untrained" in j["error"] for j in jobs)
        assert not (agent.state_dir / "models").exists()  # nothing was trained or saved

        # Opting in (experiments) lets the jobs run; join then needs [federation] and an enrollment.
        config.write_text(config.read_text() + "[learning]\nallow_untrained_ifer = true\n")
        agent.signal(signal.SIGHUP)
        status = agent.wait_for(
            lambda s: s["config_generation"] == 2 and s["workers"]["learner"]["heartbeat_age_s"] is not None
        )
        assert [w for w in status["warnings"] if "untrained" in w and "refused" not in w]
        out = _cli_wait(agent, "join")
        assert out.returncode == 1, out.stderr
        assert out.stdout.startswith("join failed:") and "does not federate" in out.stdout

        (tmp_path / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\n")
        federation = f'[federation]\nserver = "127.0.0.1:9443"\nca = "{tmp_path / "ca.pem"}"\n'
        config.write_text(config.read_text() + federation)
        agent.signal(signal.SIGHUP)
        agent.wait_for(
            lambda s: s["config_generation"] == 3 and s["workers"]["learner"]["heartbeat_age_s"] is not None
        )
        out = _cli_wait(agent, "join")
        assert out.returncode == 1, out.stderr
        assert "not enrolled" in out.stdout and "fedfer-agent enroll --state" in out.stdout
        jobs = agent.status()["jobs"]
        assert [(j["kind"], j["state"]) for j in jobs][2:] == [("join", "failed"), ("join", "failed")]
    finally:
        agent.kill()
