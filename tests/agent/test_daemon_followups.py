"""Daemon follow-ups: capture errors, the vision worker's torch runtime, drain during a job.

File sources read exactly once (ledger, back-pressure, restarts) are tested in test_daemon_files.py.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from fedfer.agent.capture.sources import SourceSequence
from fedfer.agent.capture.video import CaptureError, SourceUnavailableError
from fedfer.agent.config import apply_path_overrides, parse_config
from fedfer.agent.federation.enroll import enroll
from fedfer.agent.models.video import VideoModel, to_named_arrays
from fedfer.agent.records import FrameRecord
from fedfer.agent.store.device import open_cache
from tests.agent.daemon_harness import Agent, wait_gone, write_config
from tests.integration.federation_harness import Deployment

CLIP = "1001_DFA_HAP_XX.flv"


def _config(text: str, state_dir: Path):  # type: ignore[no-untyped-def]
    return apply_path_overrides(parse_config(text), {"FEDFER_STATE_DIR": str(state_dir)})


def test_a_missing_file_source_is_a_clear_capture_error(tmp_path: Path) -> None:
    source = SourceSequence(source=str(tmp_path / "gone.mp4"), fps=5, max_width=320, loop=False)
    with pytest.raises(SourceUnavailableError, match="does not exist") as info:
        next(iter(source))
    assert isinstance(info.value, CaptureError)


@pytest.mark.slow
def test_capture_survives_a_vanished_source_and_vision_runs_one_passive_torch_thread(
    tmp_path: Path, assets: Path
) -> None:
    clip = tmp_path / CLIP
    shutil.copy(assets / "data" / "crema-d-sample" / CLIP, clip)
    agent = Agent(tmp_path, write_config(tmp_path / "agent.toml", clips=clip))
    try:
        agent.start()
        agent.wait_for(lambda s: s["workers"]["capture"]["stats"]["frames_read"] > 0)
        pid = agent.worker_pid("capture")
        clip.unlink()  # the open file keeps playing; the next loop finds it gone
        status = agent.wait_for(lambda s: s["workers"]["capture"]["stats"].get("source_failures", 0) >= 2)
        capture = status["workers"]["capture"]
        assert "does not exist" in capture["stats"]["source_error"]
        assert capture["pid"] == pid and capture["restarts"] == 0
        vision = agent.wait_for(lambda s: "torch_threads" in s["workers"]["vision"]["stats"], timeout=60)
        stats = vision["workers"]["vision"]["stats"]
        assert stats["torch_threads"] == 1 and stats["omp_wait_policy"] == "PASSIVE"
        assert agent.stop() == 0
    finally:
        agent.kill()


def _fill_cache(config_text: str, state_dir: Path, *, sessions: int) -> None:
    cache = open_cache(_config(config_text, state_dir))
    try:
        for n in range(sessions):
            label = n % 3
            probs = np.full(6, 0.04, np.float32)
            probs[label] = 0.8
            sid = cache.begin_session()
            for i in range(5):
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


@pytest.mark.slow
def test_sigterm_during_a_join_personalization_drains_within_the_bound(tmp_path: Path, assets: Path) -> None:
    model = to_named_arrays(VideoModel(num_classes=6))
    dep = Deployment(tmp_path / "agg", min_clients=2, max_clients=3, deadline_s=120, model=model)
    agg = dep.serve("--rounds", "1", "--checkin-s", "60")
    root = tmp_path / "dev"
    root.mkdir()
    agent = Agent(root, write_config(root / "agent.toml", clips=assets / "data" / "crema-d-sample"))
    try:
        agent.config.write_text(
            agent.config.read_text()
            + f'[federation]\nserver = "127.0.0.1:{agg.port}"\nca = "{dep.dir / "pki" / "ca.pem"}"\n'
            + "[learning]\nepochs = 100\nallow_untrained_ifer = true\n"
        )
        agent.state_dir.mkdir(mode=0o700)
        asyncio.run(
            enroll(
                server=f"127.0.0.1:{agg.enroll_port}",
                ca_pem=dep.ca_pem,
                token=dep.token(),
                state_dir=agent.state_dir / "federation",
            )
        )
        _fill_cache(agent.config.read_text(), agent.state_dir, sessions=150)
        agent.start_paused()
        assert agent.client.request("join")["state"] == "running"
        central = agent.state_dir / "models" / "central.json"
        deadline = time.monotonic() + 60
        while not central.exists():  # saved right before the (long) personalization starts
            assert time.monotonic() < deadline, agent.log_text()[-2000:]
            time.sleep(0.1)
        time.sleep(1.0)
        learner = agent.worker_pid("learner")
        started = time.monotonic()
        agent.signal(signal.SIGTERM)
        assert agent.proc is not None and agent.proc.wait(30) == 0
        elapsed = time.monotonic() - started
        log = agent.log_text()
        assert "did not drain in time" not in log, log[-3000:]
        assert elapsed < 5.0 + 2.0, elapsed  # drain_timeout_s of the test daemon, plus process start-up slack
        assert wait_gone(learner, timeout=1.0)
        # Nothing cached was lost and nothing half-done was saved.
        cache = open_cache(_config(agent.config.read_text(), agent.state_dir))
        try:
            assert len(cache.sessions()) == 150
            assert cache.blob_names() == []  # no personalized model saved
        finally:
            cache.close()
    finally:
        agent.kill()
        agg.kill()
