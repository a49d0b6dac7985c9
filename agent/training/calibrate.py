"""Per-class bias calibration of IFER's g on the dev split, for macro F1 (logit adjustment).

Class-weighted cross-entropy (the paper's loss) makes g over-predict rare classes: on FER2013 it calls far
too many faces *disgust*. Adding a per-class offset ``b`` to g's logits rescales the probabilities to
``p * exp(b)`` (renormalized); the offsets are chosen on the dev split (never the test split) by coordinate
ascent on a grid, maximizing macro F1. They are folded into g's last bias, so the device runs exactly the same
network at exactly the same cost, and the export is an ordinary IFER export.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from fedfer.agent.models.ifer import FaceNet
from fedfer.agent.training.metrics import classification_report

__all__ = ["CALIBRATION_VERSION", "apply_class_bias", "fit_class_bias"]

#: Part of the calibrated export's cache key; bump when :func:`fit_class_bias` would choose differently.
CALIBRATION_VERSION = "class-bias/1"


def _macro_f1(log_probs: np.ndarray, bias: np.ndarray, labels: np.ndarray, classes: Sequence[str]) -> float:
    return classification_report(labels, (log_probs + bias).argmax(1), tuple(classes)).macro_f1


def fit_class_bias(
    probs: np.ndarray,
    labels: np.ndarray,
    classes: Sequence[str],
    *,
    span: float = 1.5,
    steps: int = 31,
    sweeps: int = 3,
    min_per_class: int = 10,
) -> np.ndarray:
    """Per-class logit offsets (float32, ``(K,)``) that maximize macro F1 of ``probs`` on ``labels``.

    Coordinate ascent: each sweep sets every class's offset in turn to the best of ``steps`` values in
    ``[-span, span]`` (ties keep the smaller change). Use dev-split probabilities only. With fewer than
    ``min_per_class`` labels of some class the offsets would only fit a handful of images: all zeros then.

    Raises:
        ValueError: shapes disagree, or the arrays are empty.
    """
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels)
    if probs.ndim != 2 or probs.shape[1] != len(classes) or len(probs) != len(labels) or len(probs) == 0:
        raise ValueError("probs must be (N, K) with N labels and K classes, N > 0")
    if np.bincount(labels.astype(np.int64), minlength=len(classes)).min() < min_per_class:
        return np.zeros(len(classes), dtype=np.float32)
    log_probs = np.log(np.clip(probs, 1e-12, 1.0))
    grid = np.linspace(-span, span, steps)
    bias = np.zeros(len(classes))
    best = _macro_f1(log_probs, bias, labels, classes)
    for _ in range(sweeps):
        changed = False
        for c in range(len(classes)):
            for value in sorted(grid, key=lambda g: abs(g - bias[c])):
                trial = bias.copy()
                trial[c] = value
                score = _macro_f1(log_probs, trial, labels, classes)
                if score > best:
                    best, bias, changed = score, trial, True
        if not changed:
            break
    return bias.astype(np.float32)


def apply_class_bias(net: FaceNet, bias: np.ndarray) -> None:
    """Add ``bias`` to g's last layer's bias in place: its probabilities become ``p * exp(bias)``, normalized.

    Raises:
        ValueError: ``bias`` does not have one entry per class.
    """
    bias = np.asarray(bias, dtype=np.float32)
    if bias.shape != (net.num_classes,):
        raise ValueError(f"need {net.num_classes} class offsets, got shape {bias.shape}")
    last = net.head.net[-1]
    assert isinstance(last, torch.nn.Linear)  # IferHead's layout; not input validation
    with torch.no_grad():
        last.bias.add_(torch.from_numpy(bias))
