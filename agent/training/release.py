"""The shipped IFER: the recipe's trained network plus how the device must crop and view faces for it.

A network trained on FER2013 expects faces framed the way FER2013 frames them. :func:`measure_framing` runs
the device's own MediaPipe detector over training faces (each upscaled and set on a black canvas, so the
detector sees the whole face) and reads off where the detector's box lies in the training image: its
median size gives the margin and its median vertical offset the shift of
:class:`~fedfer.agent.models.views.Framing`. On FER2013 the box covers ~85% of the image side and sits
~9% of the side low, so the device's old crop (margin 0.2, centred) showed the network faces ~19% smaller
and lower than it was trained on.

:func:`release_ifer` writes the export the agent ships: the trained weights (optionally without the
FER2013-dev class-bias calibration, which fits FER2013's class mix, not a person's), the measured framing and
the test-time views (:data:`RELEASE_VIEWS`), stored as float16.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedfer.agent.errors import DatasetError, ModelFileError
from fedfer.agent.models.ifer import FaceNet, load_ifer, save_ifer
from fedfer.agent.models.views import Framing, View
from fedfer.agent.training.clips import DETECTOR_SHA256

__all__ = ["RELEASE_VIEWS", "FramingMeasure", "measure_framing", "release_ifer", "strip_class_bias"]

#: The shipped IFER's views: the face and its mirror image. On dev performers 01-10, six views (three
#: vertical offsets, each mirrored) or three zooms did no better at three times the cost (docs/learning.md).
RELEASE_VIEWS: tuple[View, ...] = (View(), View(flip=True))

_UPSCALE = 4  # FER2013 faces are 48x48: the detector needs more pixels


@dataclass(frozen=True, slots=True)
class FramingMeasure:
    """What :func:`measure_framing` found."""

    framing: Framing
    faces: int
    detected: int
    box_side: float  # median detector box side, as a fraction of the training image side
    box_centre_y: float  # median vertical centre of the box, as a fraction of the image side (0.5 = middle)

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form (for manifests and benchmarks)."""
        return {
            **self.framing.as_dict(),
            "faces": self.faces,
            "detected": self.detected,
            "box_side": self.box_side,
            "box_centre_y": self.box_centre_y,
        }


def measure_framing(faces: Sequence[np.ndarray], *, detector: Path) -> FramingMeasure:
    """The framing of square grayscale training faces, measured with the device's detector.

    Raises:
        DatasetError: no face, a face that is not a square uint8 image, or no detection at all.
        ModelFileError: the detector model is missing or not the pinned file.
    """
    import cv2

    from fedfer.agent.models.weights import WeightsError
    from fedfer.agent.vision.faces import FaceDetector

    if not faces:
        raise DatasetError("no faces to measure the framing on")
    sides, centres = [], []
    try:
        detector_ = FaceDetector(model_path=detector, sha256=DETECTOR_SHA256, margin=0.0)
    except WeightsError as exc:
        raise ModelFileError("face detector model missing or not the pinned file") from exc
    with detector_:
        for face in faces:
            arr = np.asarray(face)
            if arr.dtype != np.uint8 or arr.ndim != 2 or arr.shape[0] != arr.shape[1]:
                raise DatasetError("faces must be square uint8 grayscale images")
            side = arr.shape[0] * _UPSCALE
            big = cv2.resize(arr, (side, side), interpolation=cv2.INTER_CUBIC)
            pad = side // 2
            canvas = cv2.copyMakeBorder(big, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=0)
            found = detector_.detect(np.ascontiguousarray(cv2.cvtColor(canvas, cv2.COLOR_GRAY2RGB)))
            if found is None:
                continue
            _, y, w, h = found.box
            sides.append(max(w, h) / side)
            centres.append((y - pad + h / 2.0) / side)
    if not sides:
        raise DatasetError("the detector found no face in the training images")
    box = float(np.median(sides))
    centre = float(np.median(centres))
    # The training image is 1/box box-sides wide: margin on each side; its centre lies (centre - 0.5)
    # image sides above the box's centre.
    framing = Framing(margin=round((1.0 / box - 1.0) / 2.0, 3), shift=round(-(centre - 0.5) / box, 3))
    return FramingMeasure(framing, len(faces), len(sides), box, centre)


def strip_class_bias(net: FaceNet, manifest: Path) -> bool:
    """Undo the class-bias calibration recorded in ``manifest`` on ``net`` (in place); False if none."""
    meta = json.loads(Path(manifest).read_text(encoding="utf-8"))
    calibration = meta.get("calibration")
    if not calibration:
        return False
    bias = np.asarray(calibration["class_bias"], dtype=np.float32)
    last = net.head.net[-1]
    if not isinstance(last, torch.nn.Linear) or last.bias is None or last.bias.shape != (len(bias),):
        raise ModelFileError("calibration does not fit the model's last layer")
    with torch.no_grad():
        last.bias.sub_(torch.from_numpy(bias))
    return True


def release_ifer(
    source: Path,
    out: Path,
    *,
    framing: Framing,
    views: Sequence[View] = RELEASE_VIEWS,
    strip_calibration: bool = True,
    storage: str = "float16",
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write the shipped IFER export to ``out`` (a folder) from a trained one; returns its manifest.

    Raises:
        ModelFileError: ``source`` is not a readable IFER export.
    """
    net = load_ifer(Path(source))
    stripped = strip_class_bias(net, Path(source)) if strip_calibration else False
    net.framing, net.views = framing, tuple(views)
    meta = json.loads(Path(source).read_text(encoding="utf-8"))
    kept = {
        k: meta[k] for k in ("history", "best_epoch", "train_seconds", "train_images", "recipe") if k in meta
    }
    provenance = {
        "source_sha256": meta.get("sha256"),
        "source_cache_key": meta.get("cache_key") or (meta.get("calibration") or {}).get("from"),
        "class_bias_removed": stripped,
    }
    return save_ifer(net, Path(out), extra={**kept, "release": provenance, **(extra or {})}, storage=storage)
