"""``fedfer-agent extract`` as a real process, and the daemon's vision binding built from a real config."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedfer.agent.capture.video import VideoSource
from fedfer.agent.records import FrameRecord
from fedfer.agent.store.cache import FeatureCache
from fedfer.agent.vision.pipeline import VisionPipeline
from tests.agent import vision_support as vs


def _agent(args: list[str], assets: Path, cache: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FEDFER_ASSETS": str(assets), "FEDFER_CACHE_DIR": str(cache)}
    return subprocess.run(
        [sys.executable, "-m", "fedfer.agent.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
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
    from fedfer.agent.config import config_from_dict
    from fedfer.agent.vision.pipeline import open_vision

    config = config_from_dict({"agent": {"state_dir": str(tmp_path / "state"), "assets_dir": str(assets)}})
    monkeypatch.setenv("FEDFER_CACHE_DIR", str(vs.cache_dir()))
    records = _stage_records(open_vision(config), assets, frames=2)
    assert all(r is not None and r.feature.shape == (1280,) for r in records)


def test_daemon_stage_crops_faces_the_way_the_ifer_export_says(
    assets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedfer.agent.config import config_from_dict
    from fedfer.agent.models.ifer import load_ifer
    from fedfer.agent.models.shipped import shipped_ifer
    from fedfer.agent.vision.pipeline import open_vision

    framing = load_ifer(shipped_ifer()).framing
    assert framing is not None
    config = config_from_dict(
        {
            "agent": {"state_dir": str(tmp_path / "state"), "assets_dir": str(assets)},
            "vision": {"ifer_model": str(shipped_ifer()), "margin": 0.3},
        }
    )
    monkeypatch.setenv("FEDFER_CACHE_DIR", str(vs.cache_dir()))
    stage = open_vision(config)
    # The export's framing wins over the configured margin (it is what the network was trained on).
    assert (stage.detector.margin, stage.detector.shift) == (framing.margin, framing.shift)
    records = _stage_records(stage, assets, frames=2)
    assert all(r is not None and r.ifer_probs.shape == (7,) for r in records)


def _stage_records(stage: VisionPipeline, assets: Path, *, frames: int) -> list[FrameRecord | None]:
    """Run the daemon's per-frame stage on the first frames of a real clip, then close it."""
    try:
        with VideoSource(source=vs.clips(assets)[1], max_frames=frames) as src:
            return [stage.process(f.image, f.timestamp) for f in src.frames()]
    finally:
        stage.close()


def test_daemon_stage_downloads_a_missing_detector(
    assets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedfer.agent.config import config_from_dict
    from fedfer.agent.models.weights import MEDIAPIPE_FACE_DETECTOR
    from fedfer.agent.vision.pipeline import open_vision

    www = tmp_path / "www"
    www.mkdir()
    shutil.copy(assets / vs.DETECTOR, www / "detector.tflite")
    cache = tmp_path / "agent-cache"  # the agent's cache folder; converted weights are reused from vs
    shutil.copytree(vs.cache_dir(), cache, dirs_exist_ok=True)
    shutil.rmtree(cache / "models", ignore_errors=True)
    monkeypatch.setenv("FEDFER_CACHE_DIR", str(cache))
    with vs.http_folder(www) as base:
        config = config_from_dict(
            {
                "agent": {"state_dir": str(tmp_path / "state"), "assets_dir": str(tmp_path / "no-assets")},
                "vision": {
                    "detector_model": "models/mediapipe/face_detection_short_range.tflite",  # not there
                    "detector_url": f"{base}/detector.tflite",
                    "feature_weights": str(assets / vs.TFLITE),
                },
            }
        )
        stage = open_vision(config)
    assert _stage_records(stage, assets, frames=1)[0] is not None
    downloaded = cache / "models" / "face_detection_short_range.tflite"
    assert hashlib.sha256(downloaded.read_bytes()).hexdigest() == MEDIAPIPE_FACE_DETECTOR.sha256
    # The config's defaults are the pinned file's URL and digest.
    defaults = config_from_dict({}).vision
    assert (defaults.detector_url, defaults.detector_sha256) == (
        MEDIAPIPE_FACE_DETECTOR.url,
        MEDIAPIPE_FACE_DETECTOR.sha256,
    )


def test_daemon_stage_refuses_a_wrong_download_and_an_unpinned_detector(
    assets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedfer.agent.config import ConfigError, config_from_dict
    from fedfer.agent.errors import ComponentUnavailableError
    from fedfer.agent.vision.pipeline import open_vision

    www = tmp_path / "www"
    www.mkdir()
    shutil.copy(assets / "models/mediapipe/face_landmark.tflite", www / "detector.tflite")  # not BlazeFace
    monkeypatch.setenv("FEDFER_CACHE_DIR", str(tmp_path / "agent-cache"))
    with vs.http_folder(www) as base:
        config = config_from_dict(
            {
                "agent": {"state_dir": str(tmp_path / "state"), "assets_dir": str(tmp_path / "no-assets")},
                "vision": {"detector_url": f"{base}/detector.tflite"},
            }
        )
        with pytest.raises(ComponentUnavailableError, match="does not match the pinned digest"):
            open_vision(config)
    assert list((tmp_path / "agent-cache" / "models").iterdir()) == []
    # An empty digest no longer means "do not check": the configuration is refused.
    with pytest.raises(ConfigError, match=r"vision\.detector_sha256 must be a 64-character"):
        config_from_dict({"vision": {"detector_sha256": ""}})
    with pytest.raises(ConfigError, match=r"vision\.detector_url must be"):
        config_from_dict({"vision": {"detector_url": "ftp://mirror/detector.tflite"}})


def test_fidelity_mode_reaches_f_from_the_cli_and_the_config(
    assets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from fedfer.agent.cli import main
    from fedfer.agent.config import config_from_dict
    from fedfer.agent.vision.pipeline import IferModel, open_vision

    monkeypatch.setenv("FEDFER_CACHE_DIR", str(vs.cache_dir()))
    monkeypatch.setenv("FEDFER_ASSETS", str(assets))
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")  # what the handler would set, restored afterwards
    clip = str(vs.clips(assets)[0])
    features = {}
    with vs.one_torch_thread():  # the handler sets torch's thread count; this restores it
        for emulate in (False, True):
            state = tmp_path / f"state-{emulate}"
            flags = ["--emulate-quantization"] if emulate else []
            assert main(["extract", "--video", clip, "--state", str(state), "--max-frames", "2", *flags]) == 0
            (session,) = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["sessions"]
            with FeatureCache(state / "cache") as cache:
                records = cache.read_session(session["id"])
            features[emulate] = np.stack([r.feature.astype(np.float32) for r in records])
    # Replaying TFLite's uint8 rounding changes f's outputs, a little.
    a, b = features[False], features[True]
    assert not np.array_equal(a, b)
    cosine = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cosine.min() > 0.9
    # The daemon takes the mode from [vision].
    for emulate in (False, True):
        config = config_from_dict(
            {
                "agent": {"state_dir": str(tmp_path / "state"), "assets_dir": str(assets)},
                "vision": {"emulate_tflite_quantization": emulate},
            }
        )
        stage = open_vision(config)
        try:
            assert isinstance(stage.model, IferModel)
            assert stage.model.extractor.model.emulates_quantization is emulate
        finally:
            stage.close()
