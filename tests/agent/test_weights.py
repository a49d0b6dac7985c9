"""Model downloads with pinned SHA-256: a real loopback HTTP server and file:// URLs stand in for the web."""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from fedfer.agent.capture.video import VideoSource
from fedfer.agent.models.extractor import load_feature_extractor
from fedfer.agent.models.mobilenet import IMAGENET_NORMALIZATION, MobileNetV2
from fedfer.agent.models.weights import (
    MEDIAPIPE_FACE_DETECTOR,
    TORCHVISION_MOBILENET_V2,
    PinnedFile,
    WeightsError,
    ensure_file,
    sha256_file,
    verify_sha256,
)
from fedfer.agent.vision.faces import FaceDetector, detector_model_file
from fedfer.security.errors import ValidationError
from tests.agent import vision_support as vs


@pytest.fixture()
def served(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A folder served over HTTP on 127.0.0.1 (real sockets); yields (folder, base URL)."""
    root = tmp_path / "www"
    root.mkdir()
    with vs.http_folder(root) as base:
        yield root, base


@pytest.fixture(scope="module")
def torchvision_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A torchvision-layout MobileNetV2 state dict saved locally (what mobilenet_v2-b0353104.pth holds)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tv") / "mobilenet_v2-local.pth"
    torch.save(MobileNetV2().state_dict(), path)
    return path


def test_pinned_constants_are_the_published_files(assets: Path) -> None:
    assert TORCHVISION_MOBILENET_V2.url == "https://download.pytorch.org/models/mobilenet_v2-b0353104.pth"
    # The full digest published for that URL (OpenVINO Open Model Zoo, mobilenet-v2-pytorch/model.yml), which
    # starts with torch.hub's 8-hex file-name prefix; both are checked.
    published = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"
    assert TORCHVISION_MOBILENET_V2.sha256 == published
    assert TORCHVISION_MOBILENET_V2.hub_prefix and TORCHVISION_MOBILENET_V2.max_bytes >= 14_212_972
    # The detector pin is the digest of the very file shipped in ../shared.
    assert sha256_file(assets / vs.DETECTOR) == MEDIAPIPE_FACE_DETECTOR.sha256
    assert ensure_file(MEDIAPIPE_FACE_DETECTOR, local_path=assets / vs.DETECTOR) == assets / vs.DETECTOR


def test_torchvision_weights_download_over_loopback_http(
    served: tuple[Path, str], torchvision_file: Path, tmp_path: Path
) -> None:
    root, base = served
    (root / "mobilenet_v2.pth").write_bytes(torchvision_file.read_bytes())
    pinned = PinnedFile(
        url=f"{base}/mobilenet_v2.pth", sha256=sha256_file(torchvision_file), filename="mobilenet_v2.pth"
    )
    downloads = tmp_path / "downloads"
    path = ensure_file(pinned, download_dir=downloads)
    assert path == downloads / "mobilenet_v2.pth"
    assert sha256_file(path) == pinned.sha256
    assert [p.name for p in downloads.iterdir()] == ["mobilenet_v2.pth"]  # no partial files left
    fx = load_feature_extractor(path, sha256=pinned.sha256)
    assert fx.normalization is IMAGENET_NORMALIZATION
    expected = torch.load(torchvision_file, weights_only=True)
    assert all(torch.equal(v, expected[k]) for k, v in fx.model.state_dict().items())
    # Second call: served from the verified local copy, even with the server's file gone.
    (root / "mobilenet_v2.pth").unlink()
    assert ensure_file(pinned, download_dir=downloads) == path


def test_torch_hub_prefix_is_a_second_check_never_the_only_one(
    served: tuple[Path, str], torchvision_file: Path, tmp_path: Path
) -> None:
    root, base = served
    digest = sha256_file(torchvision_file)
    name = f"mobilenet_v2-{digest[:8]}.pth"
    (root / name).write_bytes(torchvision_file.read_bytes())
    # A 32-bit prefix alone is no pin: refused before anything is fetched.
    with pytest.raises(ValidationError, match="full digest"):
        PinnedFile(url=f"{base}/{name}", sha256=digest[:8], filename=name)
    with pytest.raises(ValidationError, match="full digest"):
        verify_sha256(torchvision_file, digest[:8])
    # The full digest with the file name's prefix checked too.
    pinned = PinnedFile(url=f"{base}/{name}", sha256=digest, filename=name, hub_prefix=True)
    assert ensure_file(pinned, download_dir=tmp_path).read_bytes() == torchvision_file.read_bytes()
    # A pin whose file-name prefix disagrees with its digest, or that has no prefix, is refused.
    with pytest.raises(ValidationError, match="disagrees"):
        PinnedFile(url=f"{base}/{name}", sha256=digest, filename="mobilenet_v2-00000000.pth", hub_prefix=True)
    with pytest.raises(ValidationError, match="<name>-<hex>"):
        PinnedFile(url=f"{base}/{name}", sha256=digest, filename="mobilenet_v2.pth", hub_prefix=True)


def test_another_file_under_the_torchvision_pin_is_refused_and_not_kept(
    served: tuple[Path, str], torchvision_file: Path, tmp_path: Path
) -> None:
    # A state dict with the right layout but other weights, served where the real pin expects its file.
    root, base = served
    (root / TORCHVISION_MOBILENET_V2.filename).write_bytes(torchvision_file.read_bytes())
    pinned = dataclasses.replace(TORCHVISION_MOBILENET_V2, url=f"{base}/{TORCHVISION_MOBILENET_V2.filename}")
    downloads = tmp_path / "downloads"
    with pytest.raises(WeightsError, match="does not match"):
        ensure_file(pinned, download_dir=downloads)
    assert list(downloads.iterdir()) == []


def test_download_with_wrong_hash_is_refused_and_not_kept(
    served: tuple[Path, str], torchvision_file: Path, tmp_path: Path
) -> None:
    root, base = served
    (root / "w.pth").write_bytes(torchvision_file.read_bytes())
    wrong = hashlib.sha256(b"something else").hexdigest()
    downloads = tmp_path / "downloads"
    with pytest.raises(WeightsError, match="does not match"):
        ensure_file(PinnedFile(url=f"{base}/w.pth", sha256=wrong, filename="w.pth"), download_dir=downloads)
    assert list(downloads.iterdir()) == []
    with pytest.raises(WeightsError, match="cannot download"):
        ensure_file(
            PinnedFile(url=f"{base}/absent.pth", sha256=wrong, filename="a.pth"), download_dir=downloads
        )
    with pytest.raises(WeightsError, match="exceeds"):
        ensure_file(
            PinnedFile(url=f"{base}/w.pth", sha256=wrong, filename="w.pth", max_bytes=1000),
            download_dir=downloads,
        )
    assert list(downloads.iterdir()) == []


def test_file_url_and_local_path(torchvision_file: Path, tmp_path: Path) -> None:
    digest = sha256_file(torchvision_file)
    pinned = PinnedFile(url=torchvision_file.as_uri(), sha256=digest, filename="tv.pth")
    assert ensure_file(pinned, download_dir=tmp_path).read_bytes() == torchvision_file.read_bytes()
    assert ensure_file(pinned, local_path=torchvision_file) == torchvision_file
    tampered = tmp_path / "tampered.pth"
    tampered.write_bytes(torchvision_file.read_bytes() + b"\0")
    with pytest.raises(WeightsError, match="does not match"):
        ensure_file(pinned, local_path=tampered)
    with pytest.raises(WeightsError):
        ensure_file(pinned, local_path=tmp_path / "missing.pth")
    with pytest.raises(WeightsError):
        load_feature_extractor(tampered, sha256=digest)


def test_stale_download_is_replaced(torchvision_file: Path, tmp_path: Path) -> None:
    digest = sha256_file(torchvision_file)
    (tmp_path / "tv.pth").write_bytes(b"stale")
    path = ensure_file(
        PinnedFile(url=torchvision_file.as_uri(), sha256=digest, filename="tv.pth"), download_dir=tmp_path
    )
    assert verify_sha256(path, digest) == path


def test_pin_validation() -> None:
    with pytest.raises(ValidationError):
        PinnedFile(url="http://example.com/x", sha256="ab" * 32, filename="x")  # plain http off-host
    with pytest.raises(ValidationError):
        PinnedFile(url="ftp://127.0.0.1/x", sha256="ab" * 32, filename="x")
    for short in ("abc", "", "ab" * 4, "AB" * 32):
        with pytest.raises(ValidationError):
            PinnedFile(url="https://example.com/x", sha256=short, filename="x")
    with pytest.raises(ValidationError):
        PinnedFile(url="https://example.com/x", sha256="ab" * 32, filename="../x")
    with pytest.raises(ValidationError):
        verify_sha256(Path(__file__), "not-hex!")


# -- the face detector: downloaded when missing, always verified -------------------------------------------


def test_missing_detector_is_downloaded_verified_and_used(
    assets: Path, served: tuple[Path, str], tmp_path: Path
) -> None:
    root, base = served
    shutil.copy(assets / vs.DETECTOR, root / MEDIAPIPE_FACE_DETECTOR.filename)
    url = f"{base}/{MEDIAPIPE_FACE_DETECTOR.filename}"
    configured = tmp_path / "assets" / vs.DETECTOR  # the device shipped without it
    models = tmp_path / "models"
    path = detector_model_file(configured, url=url, download_dir=models)
    assert path == models / MEDIAPIPE_FACE_DETECTOR.filename
    assert sha256_file(path) == MEDIAPIPE_FACE_DETECTOR.sha256
    assert [p.name for p in models.iterdir()] == [path.name]  # no partial file left beside it
    with VideoSource(source=vs.clips(assets)[0], max_frames=1) as src:
        (frame,) = list(src.frames())
    with FaceDetector(model_path=path) as detector:
        assert detector.detect(frame.image) is not None
    # Later starts use the verified copy: no network needed (the served file is gone).
    (root / MEDIAPIPE_FACE_DETECTOR.filename).unlink()
    assert detector_model_file(configured, url=url, download_dir=models) == path
    # A configured file that exists is used as is (FaceDetector verifies its bytes).
    assert detector_model_file(assets / vs.DETECTOR, url="http://127.0.0.1:9/x", download_dir=models) == (
        assets / vs.DETECTOR
    )


def test_a_wrong_detector_download_is_refused_and_not_kept(
    assets: Path, served: tuple[Path, str], tmp_path: Path
) -> None:
    root, base = served
    # Another real TFLite model served under the detector's name: its digest is not the pinned one.
    shutil.copy(assets / "models/mediapipe/face_landmark.tflite", root / MEDIAPIPE_FACE_DETECTOR.filename)
    url = f"{base}/{MEDIAPIPE_FACE_DETECTOR.filename}"
    models = tmp_path / "models"
    with pytest.raises(WeightsError, match="does not match the pinned digest"):
        detector_model_file(tmp_path / "absent.tflite", url=url, download_dir=models)
    assert list(models.iterdir()) == []
    # The genuine file, but pinned to another digest: refused too, nothing kept.
    shutil.copy(assets / vs.DETECTOR, root / MEDIAPIPE_FACE_DETECTOR.filename)
    with pytest.raises(WeightsError, match="does not match the pinned digest"):
        detector_model_file(tmp_path / "absent.tflite", sha256="0" * 64, url=url, download_dir=models)
    assert list(models.iterdir()) == []
    # No digest is no pin: refused before anything is fetched or read.
    for empty in ("", "bbff11ce"):
        with pytest.raises(ValidationError, match="empty digest is refused"):
            detector_model_file(tmp_path / "absent.tflite", sha256=empty, url=url, download_dir=models)
        with pytest.raises(ValidationError, match="empty digest is refused"):
            FaceDetector(model_path=assets / vs.DETECTOR, sha256=empty)
    with pytest.raises(ValidationError, match="loopback"):
        detector_model_file(tmp_path / "absent.tflite", url="http://example.com/x", download_dir=models)
