"""Three agents (supervisor + workers each) join one real secure-aggregation round through `join`, two of
them after a restart (kill -9 of the supervisor, SIGTERM) that must keep their cache and enrollment.

Real aggregator process (``fedfer-aggregator serve``, mutual TLS over loopback), real enrollment, each agent's
learner personalizing ``v`` with DP-SGD on its own encrypted cache and sending only the masked update.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import numpy as np
import pytest

from fedfer.agent.config import apply_path_overrides, parse_config
from fedfer.agent.federation.enroll import enroll
from fedfer.agent.federation.state import DeviceState
from fedfer.agent.models.export import load_exported
from fedfer.agent.models.video import VideoModel, to_named_arrays
from fedfer.agent.records import FrameRecord
from fedfer.agent.store.device import open_cache
from tests.agent.daemon_harness import Agent, cached_features, wait_gone, write_config
from tests.integration.federation_harness import Deployment

pytestmark = pytest.mark.slow


def _fill_cache(config_text: str, state_dir: Path, *, lean: int) -> None:
    """Cached sessions whose IFER probabilities lean to a class (the plumbing is under test, not accuracy)."""
    config = apply_path_overrides(parse_config(config_text), {"FEDFER_STATE_DIR": str(state_dir)})
    cache = open_cache(config)
    try:
        for n in range(6):
            label = (lean + n) % 3
            probs = np.full(6, 0.04, np.float32)
            probs[label] = 0.8
            sid = cache.begin_session()
            for i in range(5):
                noise = np.frombuffer(os.urandom(2560), dtype=np.uint16).astype(np.float32) / 65535.0
                feature = (noise + label).astype(np.float16)
                cache.append(
                    sid,
                    FrameRecord(
                        timestamp=i * 0.1, feature=feature, ifer_probs=probs, box=(0, 0, 9, 9), score=0.9
                    ),
                )
            cache.end_session(sid)
    finally:
        cache.close()


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_three_agents_complete_a_round_and_a_new_central_v_is_published(tmp_path: Path, assets: Path) -> None:
    """Before the round, one agent's supervisor is killed with kill -9 and another stopped with SIGTERM; both
    start again with their cache (every record readable, unchanged) and enrollment (same files), and all three
    then complete the round as the devices they enrolled as."""
    central = to_named_arrays(VideoModel(num_classes=6))
    dep = Deployment(tmp_path / "agg", min_clients=3, max_clients=3, deadline_s=120, model=central)
    agg = dep.serve("--rounds", "1", "--checkin-s", "1")
    agents: list[Agent] = []
    try:
        for i in range(3):
            root = tmp_path / f"dev{i}"
            root.mkdir()
            agent = Agent(root, write_config(root / "agent.toml", clips=assets / "data" / "crema-d-sample"))
            federation = (
                f'[federation]\nserver = "127.0.0.1:{agg.port}"\nca = "{dep.dir / "pki" / "ca.pem"}"\n'
                "[learning]\nepochs = 1\nallow_untrained_ifer = true\n[privacy]\ntarget_epsilon = 2.0\n"
            )
            agent.config.write_text(agent.config.read_text() + federation)
            agent.state_dir.mkdir(mode=0o700)
            asyncio.run(
                enroll(
                    server=f"127.0.0.1:{agg.enroll_port}",
                    ca_pem=dep.ca_pem,
                    token=dep.token(),
                    state_dir=agent.state_dir / "federation",
                )
            )
            _fill_cache(agent.config.read_text(), agent.state_dir, lean=i)
            agents.append(agent.start_paused())
        before = [(_files(a.state_dir / "federation"), cached_features(a)) for a in agents]
        killed, stopped = agents[:2]
        pids = [w["pid"] for w in killed.status()["workers"].values()]
        assert killed.proc is not None
        killed.proc.kill()
        killed.proc.wait(5)
        assert stopped.stop() == 0
        assert all(wait_gone(pid) for pid in pids)
        for agent in (killed, stopped):
            assert agent.start().status()["paused"] is True
        assert [(_files(a.state_dir / "federation"), cached_features(a)) for a in agents] == before
        for agent in agents:
            assert agent.client.request("join")["state"] == "running"
        jobs = [
            a.wait_for(lambda s: s["jobs"][-1]["state"] != "running", timeout=240)["jobs"][-1] for a in agents
        ]
        assert [j["state"] for j in jobs] == ["done"] * 3, jobs
        results = [j["result"] for j in jobs]
        assert {r["status"] for r in results} == {"published"}
        assert len({r["model_version"] for r in results}) == 1 and len({r["round_id"] for r in results}) == 1
        assert all(r["selected"] == 6 and r["dp"] is True and 0 < r["epsilon"] <= 2.0 + 1e-6 for r in results)
        # The new central v is the aggregate: it exists, has v's shape, and moved away from the old one.
        status = dep.status()
        versions = sorted(int(v) for v in status["model_versions"])
        assert len(versions) == 2 and str(versions[-1]) == results[0]["model_version"]
        enrolled = [DeviceState.load(a.state_dir / "federation").device_id for a in agents]
        assert [sorted(r["participants"]) for r in status["rounds"]] == [sorted(enrolled)]
        new = dep.model(versions[-1])
        assert set(new) == set(central) and any(not np.array_equal(new[k], central[k]) for k in central)
        # Each device reports what it uploaded for the round (client-side wire counter): at least one byte
        # per parameter of v for the masked input, plus framing.
        dim = sum(a.size for a in central.values())
        for r in results:
            assert r["wire_payload_bytes"] > dim and r["wire_bytes"] > r["wire_payload_bytes"]
        # Each device saved the newly published central v (not the round's base): `personalize` starts there.
        for agent in agents:
            arrays, meta = load_exported(agent.state_dir / "models" / "central.json")
            assert meta["version"] == results[0]["model_version"] != results[0]["base_version"]
            assert set(arrays) == set(new) and all(np.array_equal(arrays[k], new[k]) for k in new)
    finally:
        for agent in agents:
            agent.kill()
        agg.kill()
