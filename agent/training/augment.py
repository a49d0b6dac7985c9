"""Training-time augmentation of IFER face images: one random affine warp per image, photometric jitter.

Each face gets a random scale (a random-resized crop), translation, small in-plane rotation and a horizontal
flip, all folded into ONE ``cv2.warpAffine`` straight to the network's input size (no intermediate resize),
then brightness/contrast jitter and optionally a cut-out patch. Augmented views cannot come from the cached
frozen-prefix activations, so training with augmentation runs the whole network on every batch
(:func:`fedfer.agent.training.ifer.train_ifer_images`).

Randomness here shapes training data only (nothing secret), so numpy's seeded generator is appropriate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedfer.agent.errors import DatasetError

__all__ = ["FaceAugment", "augment_faces"]


@dataclass(frozen=True, slots=True, kw_only=True)
class FaceAugment:
    """Ranges of the random augmentation (all uniform).

    Attributes:
        scale: zoom range (``> 1`` crops into the face, ``< 1`` shows more border).
        shift: largest translation as a fraction of the face side.
        rotation: largest in-plane rotation in degrees.
        flip: probability of a horizontal flip.
        brightness: largest additive brightness change, as a fraction of the 0..255 range.
        contrast: largest relative contrast change.
        cutout: probability of blanking one random square patch (a quarter of the side) to mean grey.
    """

    scale: tuple[float, float] = (0.9, 1.15)
    shift: float = 0.08
    rotation: float = 10.0
    flip: float = 0.5
    brightness: float = 0.15
    contrast: float = 0.25
    cutout: float = 0.25

    def __post_init__(self) -> None:
        lo, hi = self.scale
        if not 0.5 <= lo <= hi <= 2.0:
            raise DatasetError("scale must be an ordered pair in [0.5, 2]")
        if not (0 <= self.shift <= 0.3 and 0 <= self.rotation <= 45 and 0 <= self.flip <= 1):
            raise DatasetError("shift, rotation or flip out of range")
        if not (0 <= self.brightness <= 0.5 and 0 <= self.contrast <= 0.9 and 0 <= self.cutout <= 1):
            raise DatasetError("brightness, contrast or cutout out of range")


def _matrix(src: int, out: int, cfg: FaceAugment, rng: np.random.Generator) -> np.ndarray:
    """Affine map from a ``src``-sized face to the ``out``-sized network input (rotation about the centre)."""
    zoom = rng.uniform(*cfg.scale) * out / src
    angle = math.radians(rng.uniform(-cfg.rotation, cfg.rotation))
    cos, sin = zoom * math.cos(angle), zoom * math.sin(angle)
    flip = -1.0 if rng.random() < cfg.flip else 1.0
    dx, dy = rng.uniform(-cfg.shift, cfg.shift, 2) * out
    c = (src - 1) / 2.0
    # out = R * F * (p - c) + centre + shift, with F the optional mirror of x.
    m = np.array([[cos * flip, -sin], [sin * flip, cos]])
    t = np.array([(out - 1) / 2.0 + dx, (out - 1) / 2.0 + dy]) - m @ np.array([c, c])
    return np.hstack([m, t[:, None]])


def augment_faces(
    images: np.ndarray, *, size: int, config: FaceAugment, rng: np.random.Generator
) -> np.ndarray:
    """Random views of grayscale faces ``(N, H, W)`` uint8 (square) as ``(N, size, size)`` uint8.

    Raises:
        DatasetError: not a stack of square uint8 grayscale faces, or a bad ``size``.
    """
    import cv2

    arr = np.asarray(images)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[1] != arr.shape[2]:
        raise DatasetError("faces must be uint8 (N, H, W) grayscale squares")
    if type(size) is not int or size < 8:
        raise DatasetError("size must be an int >= 8")
    out = np.empty((len(arr), size, size), dtype=np.uint8)
    for i, img in enumerate(arr):
        m = _matrix(img.shape[0], size, config, rng)
        warped = cv2.warpAffine(
            img, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT101
        ).astype(np.float32)
        gain = 1.0 + rng.uniform(-config.contrast, config.contrast)
        offset = rng.uniform(-config.brightness, config.brightness) * 255.0
        warped = (warped - warped.mean()) * gain + warped.mean() + offset
        if rng.random() < config.cutout:
            side = max(size // 4, 1)
            y, x = rng.integers(0, size - side + 1, 2)
            warped[y : y + side, x : x + side] = 128.0
        out[i] = np.clip(warped + 0.5, 0, 255).astype(np.uint8)
    return out
