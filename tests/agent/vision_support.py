"""Shared helpers for the vision tests: real assets, converted weights cached once per test process."""

from __future__ import annotations

import contextlib
import functools
import http.server
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import torch

from fedfer.agent.models.extractor import FeatureExtractor, load_feature_extractor

TFLITE = Path("models/mobilenet_v2_tflite/mobilenet_v2_1.0_224_quant.tflite")
DETECTOR = Path("models/mediapipe/face_detection_short_range.tflite")
CLIPS = Path("data/crema-d-sample")


@functools.cache
def cache_dir() -> Path:
    """One conversion cache per test process (never the user's cache, never the repository)."""
    return Path(tempfile.mkdtemp(prefix="fedfer-h4-weights-"))


@functools.cache
def tflite_extractor(assets: Path, *, emulate: bool = False) -> FeatureExtractor:
    """f with the TFLite-converted ImageNet weights (converted once per process)."""
    return load_feature_extractor(assets / TFLITE, cache_dir=cache_dir(), emulate_tflite_quantization=emulate)


def clips(assets: Path) -> list[Path]:
    """The six real CREMA-D clips."""
    found = sorted((assets / CLIPS).glob("*.flv"))
    if len(found) != 6:
        raise AssertionError(f"expected 6 CREMA-D clips, found {len(found)}")
    return found


def fer_faces(assets: Path, per_class: int, split: str = "test") -> np.ndarray:
    """The first ``per_class`` FER2013 faces of every class, as 224x224 RGB uint8."""
    images = []
    for folder in sorted((assets / "data" / "fer2013" / split).iterdir()):
        for path in sorted(folder.glob("*.png"))[:per_class]:
            gray = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
            if gray is None:
                raise AssertionError(f"unreadable FER2013 image {path.name}")
            rgb = cv2.cvtColor(gray, cv2.COLOR_GRAY2RGB)
            images.append(cv2.resize(rgb, (224, 224), interpolation=cv2.INTER_LINEAR))
    return np.stack(images)


def reference_image(assets: Path, name: str) -> np.ndarray:
    """A reference image of the TFLite model folder as 224x224 RGB uint8."""
    bgr = cv2.imread(str(assets / TFLITE.parent / name), cv2.IMREAD_COLOR)
    if bgr is None:
        raise AssertionError(f"unreadable reference image {name}")
    return cv2.resize(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), (224, 224), interpolation=cv2.INTER_LINEAR)


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run torch single-threaded: on 2 shared cores, spinning OpenMP workers make runs 10x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


class _QuietServer(http.server.ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client that stops reading early (the size-limit test) is expected here


@contextlib.contextmanager
def http_folder(root: Path) -> Iterator[str]:
    """Serve ``root`` over HTTP on 127.0.0.1 (real sockets, a stand-in for the web); yields the base URL."""
    server = _QuietServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
