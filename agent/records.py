"""What the vision pipeline yields per frame and the encrypted cache stores: never a frame or a crop."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedfer.security.errors import ValidationError

__all__ = ["FrameRecord"]

FEATURE_DIM = 1280


@dataclass(frozen=True, slots=True)
class FrameRecord:
    """One processed frame of a session.

    Attributes:
        timestamp: seconds since the start of the source (monotonic within a session).
        feature: f's 1,280-d feature, float16.
        ifer_probs: g's class probabilities, float32, shape ``(K,)``.
        box: face box ``(x, y, w, h)`` in source-pixel coordinates.
        score: the detector's confidence in ``[0, 1]``.
    """

    timestamp: float
    feature: np.ndarray
    ifer_probs: np.ndarray
    box: tuple[float, float, float, float]
    score: float

    def __post_init__(self) -> None:
        if self.feature.shape != (FEATURE_DIM,) or self.feature.dtype != np.float16:
            raise ValidationError("feature must be a float16 array of shape (1280,)")
        if self.ifer_probs.ndim != 1 or self.ifer_probs.dtype != np.float32:
            raise ValidationError("ifer_probs must be a 1-d float32 array")
        if len(self.box) != 4 or not 0.0 <= self.score <= 1.0:
            raise ValidationError("box must have 4 numbers and score lie in [0, 1]")

    def __repr__(self) -> str:
        # Features are personal data: never render them.
        return (
            f"FrameRecord(timestamp={self.timestamp:.3f}, score={self.score:.2f}, "
            f"classes={self.ifer_probs.size})"
        )
