"""User-level DP for rounds through the daemon: two agents join a real secure-aggregation round with
``privacy.round_dp``; each clips its Δv, adds its share of the Gaussian noise and sends weight 1; the
published central v carries the intended noise; the per-device round budget is persisted and refuses the
next join.

Real aggregator process (mutual TLS over loopback), real enrollment, real learner workers on encrypted caches.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest

from fedfer.agent.daemon.jobs import ROUND_BUDGET_FILE
from fedfer.agent.federation.enroll import enroll
from fedfer.agent.models.video import VideoModel, to_named_arrays
from fedfer.security.dp import gaussian_epsilon
from tests.agent.daemon_harness import Agent, fill_cache, write_config
from tests.integration.federation_harness import Deployment

pytestmark = pytest.mark.slow

SIGMA, CLIP, CLIENTS = 2.0, 1.0, 2


def test_round_dp_noises_the_aggregate_weights_one_and_spends_the_round_budget(
    tmp_path: Path, assets: Path
) -> None:
    central = to_named_arrays(VideoModel(num_classes=6))
    dep = Deployment(tmp_path / "agg", min_clients=2, max_clients=2, deadline_s=120, model=central)
    # The coordinate clip is far above the noise share's std (sigma C / sqrt(n) = 1.41), as documented.
    agg = dep.serve("--rounds", "1", "--checkin-s", "1", "--clip", "20")
    one_round = gaussian_epsilon(SIGMA, 1, 1e-5)
    privacy = (
        "[learning]\nepochs = 1\nallow_untrained_ifer = true\n"
        "[privacy]\ndp = false\nround_dp = true\nround_target_epsilon = 0\n"
        f"round_noise_multiplier = {SIGMA}\nround_clip_norm = {CLIP}\nround_clients = {CLIENTS}\n"
        f"round_budget = {1.2 * one_round}\n"
    )
    agents: list[Agent] = []
    try:
        for i, sessions in enumerate((6, 3)):  # different clip counts: FedAvg weights would differ
            root = tmp_path / f"dev{i}"
            root.mkdir()
            agent = Agent(root, write_config(root / "agent.toml", clips=assets / "data" / "crema-d-sample"))
            ca = dep.dir / "pki" / "ca.pem"
            federation = f'[federation]\nserver = "127.0.0.1:{agg.port}"\nca = "{ca}"\n'
            agent.config.write_text(agent.config.read_text() + federation + privacy)
            agent.state_dir.mkdir(mode=0o700)
            asyncio.run(
                enroll(
                    server=f"127.0.0.1:{agg.enroll_port}",
                    ca_pem=dep.ca_pem,
                    token=dep.token(),
                    state_dir=agent.state_dir / "federation",
                )
            )
            fill_cache(agent.config.read_text(), agent.state_dir, sessions=sessions, frames=4)
            agents.append(agent.start_paused())
        for agent in agents:
            assert agent.client.request("join")["state"] == "running"
        jobs = [
            a.wait_for(lambda s: s["jobs"][-1]["state"] != "running", timeout=240)["jobs"][-1] for a in agents
        ]
        assert [j["state"] for j in jobs] == ["done"] * 2, jobs
        results = [j["result"] for j in jobs]
        assert {r["status"] for r in results} == {"published"}
        assert [r["selected"] for r in results] == [6, 3]
        # The job results (what `fedfer-agent status` shows) carry the round's epsilon and its settings.
        for r in results:
            assert r["round_dp"] is True and r["round_noise_multiplier"] == SIGMA
            assert r["round_epsilon"] == pytest.approx(one_round)
            assert r["round_epsilon_total"] == pytest.approx(one_round)
            assert r["round_noise_share_std"] == pytest.approx(SIGMA * CLIP / np.sqrt(CLIENTS))
        # Weight 1 per device, not the clip counts (6 + 3): the aggregator logs the round's total weight.
        assert "total weight 2," in agg.log(), agg.log()[-2000:]
        # The published v is central + mean of the clipped, noised deltas: the noise of the mean has std
        # sigma C / n per coordinate (the clipped signal, norm <= C over 205K coordinates, is negligible).
        versions = sorted(int(v) for v in dep.status()["model_versions"])
        new = dep.model(versions[-1])
        step = np.concatenate([(new[k].astype(np.float64) - central[k]).ravel() for k in sorted(central)])
        assert step.std() == pytest.approx(SIGMA * CLIP / CLIENTS, rel=0.03)
        assert abs(step.mean()) < 0.01
        # Each device persisted the round in its round budget ...
        for agent in agents:
            kept = json.loads((agent.state_dir / ROUND_BUDGET_FILE).read_text())
            assert len(kept["rounds"]) == 1 and kept["epsilon_total"] == pytest.approx(one_round)
        # ... and a second round would exceed it: the join is refused before any contact with the aggregator.
        agg.kill()
        assert agents[0].client.request("join")["state"] == "running"
        job = agents[0].wait_for(lambda s: s["jobs"][-1]["state"] != "running", timeout=60)["jobs"][-1]
        assert job["state"] == "failed" and "round privacy budget" in job["error"], job
        kept = json.loads((agents[0].state_dir / ROUND_BUDGET_FILE).read_text())
        assert len(kept["rounds"]) == 1
    finally:
        for agent in agents:
            agent.kill()
        agg.kill()
