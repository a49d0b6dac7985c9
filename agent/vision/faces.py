"""Face detection with MediaPipe Tasks' ``FaceDetector`` (BlazeFace) and square face crops for ``f``.

The detector model is read from a path into memory, its SHA-256 checked against the pinned digest (always:
an empty digest is refused), and the verified bytes (not the path, which could change in between) are handed
to MediaPipe. A device without the model file fetches it with :func:`detector_model_file` (MediaPipe's URL,
pinned SHA-256, into the agent's model folder). Per frame the largest
face is kept; its box is widened by a margin, made square around its centre, cut out (zero-padded where it
leaves the frame) and resized to 224x224 RGB ``uint8``. The normalization that belongs to the feature
extractor's weights is applied later, by :class:`fedfer.agent.models.extractor.FeatureExtractor`.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from fedfer.agent.models.mobilenet import INPUT_SIZE
from fedfer.agent.models.weights import (
    MEDIAPIPE_FACE_DETECTOR,
    PinnedFile,
    WeightsError,
    ensure_file,
    pinned_sha256,
)
from fedfer.security.errors import FedferError, ValidationError

__all__ = ["DetectionError", "Face", "FaceDetector", "detector_model_file", "square_crop"]

_log = logging.getLogger(__name__)


def _pinned_digest(sha256: str) -> str:
    try:
        return pinned_sha256(sha256)
    except ValidationError:
        raise ValidationError(
            "the face detector model needs its pinned SHA-256 (64 hex digits); an empty digest is refused"
        ) from None


def detector_model_file(
    path: str | Path,
    *,
    sha256: str = MEDIAPIPE_FACE_DETECTOR.sha256,
    url: str = MEDIAPIPE_FACE_DETECTOR.url,
    download_dir: str | Path | None = None,
    timeout: float = 60.0,
) -> Path:
    """The detector model to load: ``path`` when that file exists, else a verified download.

    A device in the field may ship without the model. Then it is fetched from ``url`` (MediaPipe's own by
    default) into ``download_dir`` (default: the agent's model folder ``<cache>/models``) by
    :func:`fedfer.agent.models.weights.ensure_file`, which checks ``sha256`` before renaming the file into
    place and reuses a verified earlier download. A file that exists is returned as is: :class:`FaceDetector`
    checks the digest of the bytes it loads.

    Raises:
        ValidationError: ``sha256`` is not a full hex digest (an empty one is refused), or ``url``'s scheme is
            refused (https, file, or http to a loopback host only).
        WeightsError: the download failed or has another digest (nothing is kept).
    """
    digest = _pinned_digest(sha256)
    local = Path(path)
    if local.is_file():
        return local
    pinned = PinnedFile(url=url, sha256=digest, filename=local.name or MEDIAPIPE_FACE_DETECTOR.filename)
    _log.info("face detector model %s is missing; downloading the pinned file", local.name)
    return ensure_file(pinned, download_dir=download_dir, timeout=timeout)


class DetectionError(FedferError):
    """MediaPipe failed while running the detector graph."""


@dataclass(frozen=True, slots=True, repr=False)
class Face:
    """The largest face of a frame.

    Attributes:
        box: ``(x, y, w, h)`` of the detector's box in source pixels.
        score: detector confidence in ``[0, 1]``.
        crop: RGB ``uint8`` ``(size, size, 3)`` square crop around the box (RAM only).
    """

    box: tuple[float, float, float, float]
    score: float
    crop: np.ndarray

    def __repr__(self) -> str:
        return f"Face(box={tuple(round(v, 1) for v in self.box)}, score={self.score:.2f})"


def square_crop(
    image: np.ndarray,
    box: tuple[float, float, float, float],
    *,
    margin: float,
    shift: float = 0.0,
    size: int = INPUT_SIZE,
) -> np.ndarray:
    """A ``size`` x ``size`` RGB crop of ``image`` around ``box`` widened by ``margin`` on each side.

    The square's side is ``max(w, h) * (1 + 2 * margin)``, its centre the box's moved down by
    ``shift * max(w, h)`` (negative: up); parts outside the frame are black.

    Args:
        image: RGB ``uint8`` ``(H, W, 3)``.
        box: ``(x, y, w, h)`` in pixels.
        margin: fraction of the box size added on each side.
        shift: vertical offset of the crop's centre, as a fraction of the box size.
        size: output side in pixels.
    """
    import cv2

    x, y, w, h = box
    side = max(w, h) * (1.0 + 2.0 * margin)
    cx, cy = x + w / 2.0, y + h / 2.0 + shift * max(w, h)
    x0, y0 = round(cx - side / 2.0), round(cy - side / 2.0)
    s = max(1, round(side))
    height, width = image.shape[:2]
    ix0, iy0, ix1, iy1 = max(x0, 0), max(y0, 0), min(x0 + s, width), min(y0 + s, height)
    if ix0 >= ix1 or iy0 >= iy1:
        return np.zeros((size, size, 3), np.uint8)
    region = image[iy0:iy1, ix0:ix1]
    if (ix0, iy0, ix1, iy1) != (x0, y0, x0 + s, y0 + s):
        canvas = np.zeros((s, s, 3), np.uint8)
        canvas[iy0 - y0 : iy1 - y0, ix0 - x0 : ix1 - x0] = region
        region = canvas
    interp = cv2.INTER_AREA if s > size else cv2.INTER_LINEAR
    return np.ascontiguousarray(cv2.resize(region, (size, size), interpolation=interp))


class FaceDetector:
    """MediaPipe Tasks ``FaceDetector`` (IMAGE mode: frames are independent, results deterministic).

    Args:
        model_path: BlazeFace ``.tflite`` file (see :func:`detector_model_file` to fetch a missing one).
        sha256: pinned hex digest of the model (default: the short-range detector's); never empty.
        min_confidence: detections below this score are ignored.
        margin: fraction of the box added on each side of the crop.
        shift: the crop's centre moved down by this fraction of the box (negative: up); an IFER export's
            :class:`fedfer.agent.models.views.Framing` gives margin and shift together.
        crop_size: side of the square crop.

    Raises:
        ValidationError: ``sha256`` is not a full hex digest (an empty digest is refused); a bad option.
        WeightsError: model file missing, unreadable or not the pinned file; MediaPipe refuses it.

    MediaPipe accepts any ``.tflite`` at creation and fails only when its graph runs (and a failed graph
    leaves MediaPipe's task runner in a bad state), so the pinned digest is what guarantees the file is a
    BlazeFace detector: never pin a digest you have not checked.
    """

    def __init__(
        self,
        *,
        model_path: str | Path,
        sha256: str = MEDIAPIPE_FACE_DETECTOR.sha256,
        min_confidence: float = 0.5,
        margin: float = 0.2,
        shift: float = 0.0,
        crop_size: int = INPUT_SIZE,
    ) -> None:
        if not 0.0 < min_confidence <= 1.0:
            raise ValidationError("min_confidence must lie in (0, 1]")
        if not 0.0 <= margin <= 1.0:
            raise ValidationError("margin must lie in [0, 1]")
        if not -0.5 <= shift <= 0.5:
            raise ValidationError("shift must lie in [-0.5, 0.5]")
        if type(crop_size) is not int or not 32 <= crop_size <= 1024:
            raise ValidationError("crop_size must be an int in [32, 1024]")
        expected = _pinned_digest(sha256)
        path = Path(model_path)
        try:
            blob = path.read_bytes()
        except OSError as exc:
            raise WeightsError(f"face detector model not readable: {path.name}") from exc
        if not hmac.compare_digest(hashlib.sha256(blob).hexdigest(), expected):
            raise WeightsError(f"SHA-256 of {path.name} does not match the pinned digest; file refused")
        from mediapipe.tasks.python import BaseOptions, vision

        options = vision.FaceDetectorOptions(
            base_options=BaseOptions(model_asset_buffer=blob),
            running_mode=vision.RunningMode.IMAGE,
            min_detection_confidence=float(min_confidence),
        )
        try:
            self._detector: Any = vision.FaceDetector.create_from_options(options)
        except (RuntimeError, ValueError) as exc:
            raise WeightsError(f"MediaPipe cannot load {path.name} as a face detector") from exc
        self.margin = float(margin)
        self.shift = float(shift)
        self.crop_size = crop_size

    def __repr__(self) -> str:
        is_open = self._detector is not None
        return (
            f"FaceDetector(margin={self.margin}, shift={self.shift}, crop_size={self.crop_size}, "
            f"open={is_open})"
        )

    def __enter__(self) -> FaceDetector:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Release MediaPipe's graph (idempotent)."""
        detector, self._detector = self._detector, None
        if detector is not None:
            try:
                detector.close()
            except (RuntimeError, ValueError):
                # A graph that already failed reports that failure again when closed; it is released anyway.
                _log.debug("MediaPipe reported an error while closing the face detector")

    def detect(self, image: np.ndarray) -> Face | None:
        """The largest face in an RGB ``uint8`` frame ``(H, W, 3)``, or ``None``.

        Raises:
            ValidationError: the frame is not an RGB ``uint8`` array, or the detector is closed.
            DetectionError: MediaPipe's graph failed on the frame.
        """
        if (
            not isinstance(image, np.ndarray)
            or image.dtype != np.uint8
            or image.ndim != 3
            or image.shape[2] != 3
        ):
            raise ValidationError("frame must be an RGB uint8 array (H, W, 3)")
        if self._detector is None:
            raise ValidationError("face detector is closed")
        import mediapipe as mp

        frame = mp.Image(image_format=mp.ImageFormat.SRGB, data=np.ascontiguousarray(image))
        try:
            result = self._detector.detect(frame)
        except RuntimeError as exc:
            raise DetectionError("MediaPipe face detection failed") from exc
        best: tuple[float, tuple[float, float, float, float], float] | None = None
        height, width = image.shape[:2]
        for det in result.detections:
            bb = det.bounding_box
            x, y = float(bb.origin_x), float(bb.origin_y)
            w, h = float(bb.width), float(bb.height)
            # Clip to the frame so boxes are comparable and stored coordinates stay meaningful.
            x1, y1 = min(x + w, float(width)), min(y + h, float(height))
            x, y = max(x, 0.0), max(y, 0.0)
            w, h = x1 - x, y1 - y
            if w <= 1 or h <= 1:
                continue
            score = float(det.categories[0].score) if det.categories else 0.0
            if best is None or w * h > best[0]:
                best = (w * h, (x, y, w, h), min(max(score, 0.0), 1.0))
        if best is None:
            return None
        _, box, score = best
        return Face(
            box=box,
            score=score,
            crop=square_crop(image, box, margin=self.margin, shift=self.shift, size=self.crop_size),
        )
