"""How an IFER export wants its faces: the crop around the detector's box, and its test-time views.

* :class:`Framing`: the square crop the network was trained on, relative to MediaPipe's face box: ``margin``
  (fraction of the box added on each side) and ``shift`` (the crop's centre moved down by this fraction of the
  box side; negative moves it up, towards the forehead). FER2013's faces are framed tighter and higher than
  the device's old default crop (margin 0.2, centred); :func:`fedfer.agent.training.release.measure_framing`
  measures the framing of a training set with the device's own detector, and the export records it so the
  device crops live faces the way the training faces were framed.
* :class:`View`: one test-time view of a face crop: a zoom about the centre, a vertical shift and an optional
  mirror, made by one affine warp straight to the network's input size. An export with several views gives
  each face the mean of f over its views (and g of that mean), so the features v is trained, personalized and
  federated on are the same everywhere.

Exports without these fields behave as before: no framing (the device's configured margin) and one plain view.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedfer.agent.errors import ModelFileError

__all__ = ["PLAIN", "Framing", "View", "framing_from_manifest", "render_views", "views_from_manifest"]


@dataclass(frozen=True, slots=True)
class Framing:
    """The square crop around a detected face box (see the module docstring)."""

    margin: float
    shift: float = 0.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.margin) and 0.0 <= self.margin <= 1.0):
            raise ModelFileError("framing margin must lie in [0, 1]")
        if not (math.isfinite(self.shift) and -0.5 <= self.shift <= 0.5):
            raise ModelFileError("framing shift must lie in [-0.5, 0.5]")

    def as_dict(self) -> dict[str, float]:
        """The manifest's ``framing`` entry."""
        return {"margin": self.margin, "shift": self.shift}


@dataclass(frozen=True, slots=True)
class View:
    """One test-time view: ``zoom`` (> 1 looks closer), ``dy`` (fraction of the side, > 0 moves the window
    down) and ``flip`` (mirror left-right)."""

    zoom: float = 1.0
    dy: float = 0.0
    flip: bool = False

    def __post_init__(self) -> None:
        if not (math.isfinite(self.zoom) and 0.5 <= self.zoom <= 2.0):
            raise ModelFileError("view zoom must lie in [0.5, 2]")
        if not (math.isfinite(self.dy) and -0.25 <= self.dy <= 0.25):
            raise ModelFileError("view dy must lie in [-0.25, 0.25]")
        if type(self.flip) is not bool:
            raise ModelFileError("view flip must be a bool")

    @property
    def plain(self) -> bool:
        """The face as it is (no warp, no mirror)."""
        return self.zoom == 1.0 and self.dy == 0.0 and not self.flip

    def as_dict(self) -> dict[str, Any]:
        """One entry of the manifest's ``views`` list."""
        return {"zoom": self.zoom, "dy": self.dy, "flip": self.flip}


#: The single plain view of an export that states none.
PLAIN: tuple[View, ...] = (View(),)


def _number(entry: Mapping[str, Any], key: str, default: float) -> float:
    value = entry.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ModelFileError(f"manifest field {key!r} must be a number")
    return float(value)


def framing_from_manifest(meta: Mapping[str, Any]) -> Framing | None:
    """The export's framing, or ``None`` when it states none.

    Raises:
        ModelFileError: the entry is malformed.
    """
    entry = meta.get("framing")
    if entry is None:
        return None
    if not isinstance(entry, Mapping):
        raise ModelFileError("manifest field 'framing' must be an object")
    return Framing(margin=_number(entry, "margin", 0.0), shift=_number(entry, "shift", 0.0))


def views_from_manifest(meta: Mapping[str, Any]) -> tuple[View, ...]:
    """The export's test-time views (:data:`PLAIN` when it states none).

    Raises:
        ModelFileError: the list is empty, longer than 16, or an entry is malformed.
    """
    entries = meta.get("views")
    if entries is None:
        return PLAIN
    if not isinstance(entries, list) or not 1 <= len(entries) <= 16:
        raise ModelFileError("manifest field 'views' must be a list of 1 to 16 views")
    views = []
    for entry in entries:
        if not isinstance(entry, Mapping):
            raise ModelFileError("each view must be an object")
        flip = entry.get("flip", False)
        if type(flip) is not bool:
            raise ModelFileError("view flip must be a bool")
        views.append(View(zoom=_number(entry, "zoom", 1.0), dy=_number(entry, "dy", 0.0), flip=flip))
    return tuple(views)


def _resize(face: np.ndarray, size: int) -> np.ndarray:
    import cv2

    if face.shape[:2] == (size, size):
        return face
    interp = cv2.INTER_AREA if face.shape[0] > size else cv2.INTER_LINEAR
    return np.asarray(cv2.resize(face, (size, size), interpolation=interp))


def _warp(face: np.ndarray, view: View, size: int) -> np.ndarray:
    """One affine warp of a square face straight to ``size``: zoom about the centre, shift, mirror."""
    import cv2

    src = face.shape[0]
    # Shrink large crops first so the warp's bilinear sampling does not alias (as INTER_AREA would not).
    if src > 2 * size:
        face = _resize(face, 2 * size)
        src = face.shape[0]
    scale = view.zoom * size / src
    sx = -scale if view.flip else scale
    c_src = (src - 1) / 2.0
    c_out = (size - 1) / 2.0
    # out = S (p - c_src - (0, dy*src)) + c_out, with S = diag(sx, scale).
    m = np.array(
        [[sx, 0.0, c_out - sx * c_src], [0.0, scale, c_out - scale * (c_src + view.dy * src)]],
        dtype=np.float64,
    )
    return np.asarray(
        cv2.warpAffine(face, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    )


def render_views(faces: Sequence[np.ndarray], views: Sequence[View], size: int) -> np.ndarray:
    """``(N * V, size, size)`` uint8: each grayscale face's views, face by face (``V = len(views)``).

    A plain view is the face resized (area interpolation when shrinking), exactly what a one-view export
    always did; other views are one affine warp each, with the border replicated.
    """
    out = np.empty((len(faces) * len(views), size, size), dtype=np.uint8)
    k = 0
    for face in faces:
        for view in views:
            if view.zoom == 1.0 and view.dy == 0.0:
                plain = _resize(face, size)
                out[k] = plain[:, ::-1] if view.flip else plain
            else:
                out[k] = _warp(face, view, size)
            k += 1
    return out
