"""What the vision pipeline yields per frame and the encrypted cache stores: never a frame or a crop.

The constants every stage after vision agrees on live here: the size of ``f``'s feature
(:data:`FEATURE_DIM`), the class sets shared by IFER and the video model (:data:`CLASS_SETS`; IFER makes the
video model's pseudo labels, so they must agree) and the most classes a record may carry
(:data:`MAX_CLASSES`, checked by :class:`FrameRecord`, so the daemon's wire and the cache accept the same).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedfer.security.errors import ValidationError

__all__ = ["CLASS_SETS", "FEATURE_DIM", "MAX_CLASSES", "FrameRecord", "check_num_classes"]

#: Length of MobileNetV2 ``f``'s feature vector (its last 1x1 convolution's channels).
FEATURE_DIM = 1280

#: Class sets by size, in label order.
CLASS_SETS: dict[int, tuple[str, ...]] = {
    4: ("happiness", "anger", "sadness", "neutral"),
    6: ("happiness", "anger", "sadness", "neutral", "fear", "disgust"),
    7: ("happiness", "anger", "sadness", "neutral", "fear", "disgust", "surprise"),
}

#: The most class probabilities a record carries.
MAX_CLASSES = 16


def check_num_classes(num_classes: object) -> int:
    """``num_classes`` if it names a class set (4, 6 or 7).

    Raises:
        ValidationError: anything else (a bool is not a number of classes).
    """
    if type(num_classes) is not int or num_classes not in CLASS_SETS:
        raise ValidationError(f"num_classes must be one of {sorted(CLASS_SETS)}")
    return num_classes


@dataclass(frozen=True, slots=True)
class FrameRecord:
    """One processed frame of a session.

    Attributes:
        timestamp: seconds since the start of the source (monotonic within a session).
        feature: f's 1,280-d feature, float16.
        ifer_probs: g's class probabilities, float32, shape ``(K,)`` with ``1 <= K <= MAX_CLASSES``.
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
        if not 1 <= self.ifer_probs.size <= MAX_CLASSES:
            raise ValidationError(f"ifer_probs must hold 1 to {MAX_CLASSES} classes")
        if len(self.box) != 4 or not 0.0 <= self.score <= 1.0:
            raise ValidationError("box must have 4 numbers and score lie in [0, 1]")

    def __repr__(self) -> str:
        # Features are personal data: never render them.
        return (
            f"FrameRecord(timestamp={self.timestamp:.3f}, score={self.score:.2f}, "
            f"classes={self.ifer_probs.size})"
        )
