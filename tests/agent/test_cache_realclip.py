"""The real pipeline into the real cache: a CREMA-D clip → MediaPipe → MobileNetV2 f → g → encrypted cache.

Round trip of real features, and an at-rest audit of the state directory and of the temp directory the run
used: no frame, no face crop, no plaintext feature may be found there.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest

from fedfer.agent.capture.video import VideoSource
from fedfer.agent.models.ifer import IferHead
from fedfer.agent.store.cache import FeatureCache
from fedfer.agent.vision.faces import FaceDetector
from fedfer.agent.vision.pipeline import IferModel, VisionPipeline
from fedfer.bench.atrest import AtRestScanner
from tests.agent.vision_support import CLIPS, DETECTOR, tflite_extractor

CLIP = "1001_DFA_HAP_XX.flv"


@pytest.mark.slow
def test_real_clip_round_trips_and_leaves_nothing_readable(
    assets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    extractor = tflite_extractor(assets)  # converted once per test process, outside the audited folders
    state = tmp_path / "state"
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))

    with FeatureCache(state / "cache") as cache:
        detector = FaceDetector(model_path=assets / DETECTOR)
        model = IferModel(extractor=extractor, head=IferHead(num_classes=6))
        with (
            VisionPipeline(detector=detector, model=model, sink=cache) as pipeline,
            VideoSource(source=assets / CLIPS / CLIP, max_frames=24) as source,
        ):
            sessions = list(pipeline.run(source.frames()))
        produced = [r for s in sessions for r in s.records]
        assert len(produced) >= 20  # faces in nearly every frame of the clip

        # Round trip: what the cache returns is bit for bit what the pipeline produced.
        stored = []
        for s in sessions:
            contents = cache.recover_session(s.session_id)
            assert contents.complete and contents.failed == ()
            stored += [r for _, r in contents.records]
        assert len(stored) == len(produced)
        for a, b in zip(stored, produced, strict=True):
            assert np.array_equal(a.feature.view(np.uint16), b.feature.view(np.uint16))
            assert np.array_equal(a.ifer_probs, b.ifer_probs)
            assert (a.timestamp, a.box) == (b.timestamp, b.box)

        # At rest: the real features are known to the scanner, which would find them if they were there.
        features = [r.feature for r in produced]
        scanner = AtRestScanner(known_vectors=features)
        kinds = {kind for _, kind, _ in scanner.scan_bytes(b"\0" * 100 + features[3].tobytes())}
        assert {"known_vector", "float16_run"} <= kinds  # positive control on a real feature
        report = scanner.scan([state, scratch])
        assert report.clean, report.summary()
        assert report.files_scanned >= 3 and report.bytes_scanned > len(produced) * 2600
