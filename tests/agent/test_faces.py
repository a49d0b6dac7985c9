"""MediaPipe Tasks FaceDetector on the real CREMA-D clips; pinned model digest; square crops."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from fedfer.agent.capture.video import VideoSource
from fedfer.agent.models.weights import WeightsError
from fedfer.agent.vision.faces import FaceDetector, square_crop
from fedfer.security.errors import ValidationError
from tests.agent import vision_support as vs


def test_face_found_in_at_least_95_percent_of_frames(assets: Path) -> None:
    seen = found = 0
    with FaceDetector(model_path=assets / vs.DETECTOR) as detector:
        for clip in vs.clips(assets):
            with VideoSource(source=clip) as src:
                for frame in src.frames():
                    face = detector.detect(frame.image)
                    seen += 1
                    if face is None:
                        continue
                    found += 1
                    x, y, w, h = face.box
                    assert x >= 0 and y >= 0 and x + w <= 480 and y + h <= 360
                    assert 0.5 <= face.score <= 1.0
                    assert face.crop.shape == (224, 224, 3) and face.crop.dtype == np.uint8
    print(f"\nfaces found in {found}/{seen} CREMA-D frames")
    assert seen >= 370
    assert found / seen >= 0.95


def test_detection_deterministic_and_no_face_in_blank_frame(assets: Path) -> None:
    clip = vs.clips(assets)[0]
    with VideoSource(source=clip, max_frames=3) as src:
        frames = list(src.frames())
    with FaceDetector(model_path=assets / vs.DETECTOR, margin=0.2) as detector:
        a = [detector.detect(f.image) for f in frames]
        b = [detector.detect(f.image) for f in frames]
        assert detector.detect(np.zeros((360, 480, 3), np.uint8)) is None
    for fa, fb in zip(a, b, strict=True):
        assert fa is not None and fb is not None
        assert fa.box == fb.box and fa.score == fb.score
        assert np.array_equal(fa.crop, fb.crop)
    assert "crop" not in repr(a[0])


def test_largest_face_is_chosen(assets: Path) -> None:
    with VideoSource(source=vs.clips(assets)[0], max_frames=1) as src:
        (frame,) = list(src.frames())
    with FaceDetector(model_path=assets / vs.DETECTOR) as detector:
        big = detector.detect(frame.image)
        assert big is not None
        # Two copies of the scene side by side, the right one at half size: the left (larger) face wins.
        small = frame.image[::2, ::2]
        canvas = np.zeros((360, 720, 3), np.uint8)
        canvas[:, :480] = frame.image
        canvas[90:270, 480:720] = small
        face = detector.detect(canvas)
    assert face is not None
    assert face.box[0] < 480 and face.box[2] == pytest.approx(big.box[2], rel=0.15)


def test_model_digest_is_enforced(assets: Path, tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="does not match"):
        FaceDetector(model_path=assets / vs.DETECTOR, sha256="0" * 64)
    tampered = tmp_path / "detector.tflite"
    shutil.copy(assets / vs.DETECTOR, tampered)
    with tampered.open("ab") as fh:
        fh.write(b"\0")
    with pytest.raises(WeightsError):
        FaceDetector(model_path=tampered)
    with pytest.raises(WeightsError, match="not readable"):
        FaceDetector(model_path=tmp_path / "missing.tflite")
    # The real detector, but pinned to another model's digest (the MobileNetV2 file's): refused.
    from fedfer.agent.models.weights import sha256_file

    with pytest.raises(WeightsError):
        FaceDetector(model_path=assets / vs.DETECTOR, sha256=sha256_file(assets / vs.TFLITE))


def test_bad_frames_and_closed_detector(assets: Path) -> None:
    detector = FaceDetector(model_path=assets / vs.DETECTOR)
    with pytest.raises(ValidationError):
        detector.detect(np.zeros((10, 10), np.uint8))
    with pytest.raises(ValidationError):
        detector.detect(np.zeros((10, 10, 3), np.float32))
    detector.close()
    detector.close()
    with pytest.raises(ValidationError, match="closed"):
        detector.detect(np.zeros((10, 10, 3), np.uint8))
    for bad in ({"min_confidence": 0.0}, {"margin": 2.0}, {"crop_size": 8}):
        with pytest.raises(ValidationError):
            FaceDetector(model_path=assets / vs.DETECTOR, **bad)


def test_square_crop_geometry() -> None:
    image = np.zeros((100, 200, 3), np.uint8)
    image[40:60, 90:110] = 255  # a white 20x20 square in the middle
    crop = square_crop(image, (90.0, 40.0, 20.0, 20.0), margin=0.5, size=40)
    assert crop.shape == (40, 40, 3)
    # Side 40 around the square's centre: the white square fills the central half.
    assert crop[20, 20].tolist() == [255, 255, 255] and crop[2, 2].tolist() == [0, 0, 0]
    assert crop[12:28, 12:28].min() == 255
    # A box at the corner: the part outside the frame is black, the crop keeps its size.
    image[:] = 200
    corner = square_crop(image, (0.0, 0.0, 20.0, 20.0), margin=0.5, size=40)
    assert corner.shape == (40, 40, 3)
    assert corner[0, 0].tolist() == [0, 0, 0] and corner[39, 39].tolist() == [200, 200, 200]
