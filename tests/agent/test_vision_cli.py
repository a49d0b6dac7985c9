"""``fedfer-agent extract`` as a real process, and the daemon's vision binding built from a real config."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from agent.cache import FeatureCache
from agent.capture import VideoSource
from tests.agent import vision_support as vs


def _agent(args: list[str], assets: Path, cache: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FEDFER_ASSETS": str(assets), "FEDFER_CACHE_DIR": str(cache)}
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *args], capture_output=True, text=True, env=env, timeout=300
    )


def test_extract_writes_sessions_to_the_encrypted_cache(assets: Path, tmp_path: Path) -> None:
    clip = vs.clips(assets)[0]
    state = tmp_path / "state"
    done = _agent(
        ["extract", "--video", str(clip), "--state", str(state), "--sample-fps", "5", "--max-frames", "5"],
        assets,
        vs.cache_dir(),
    )
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["frames"] == 5 and summary["faces"] == 5
    (session,) = summary["sessions"]
    with FeatureCache(state / "cache") as cache:
        records = cache.read_session(session["id"])
    assert len(records) == session["frames"] == 5
    assert all(r.feature.dtype == np.float16 and r.ifer_probs.shape == (6,) for r in records)


def test_extract_missing_video_is_a_clear_error(assets: Path, tmp_path: Path) -> None:
    args = ["extract", "--video", str(tmp_path / "nope.flv"), "--state", str(tmp_path / "s")]
    done = _agent(args, assets, vs.cache_dir())
    assert done.returncode == 2
    assert "fedfer-agent: error:" in done.stderr and "does not exist" in done.stderr
    assert "Traceback" not in done.stderr


def test_daemon_stage_from_config(assets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from agent.config import config_from_dict
    from agent.pipeline import daemon_stage

    config = config_from_dict({"agent": {"state_dir": str(tmp_path / "state"), "assets_dir": str(assets)}})
    monkeypatch.setenv("FEDFER_CACHE_DIR", str(vs.cache_dir()))
    stage = daemon_stage(config)
    try:
        with VideoSource(source=vs.clips(assets)[1], max_frames=2) as src:
            records = [stage.process(f.image, f.timestamp) for f in src.frames()]
    finally:
        stage.close()
    assert all(r is not None and r.feature.shape == (1280,) for r in records)
