"""Central training of the video model ``v`` (Salman & Busso, ICMI 2022): per-frame FC layers + LSTM(64),
many-to-one.

Whole clips with zero pre-padding, class-weighted cross-entropy, Adam lr 1e-3 halved on a dev plateau, 20
epochs by default; the weights of the best dev epoch are kept. With partial labels (Daffa et al. 2024) the
target is the crowd's vote distribution (softmax over vote counts with zero-vote classes masked out) and the
loss is the KL divergence. The export is named arrays + a manifest: what the aggregator serves as round 0.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedfer.agent.errors import DatasetError, ModelFileError
from fedfer.agent.learning.personalize import predict_clips
from fedfer.agent.models.export import load_exported, save_exported
from fedfer.agent.models.video import VideoModel, from_named_arrays, to_named_arrays
from fedfer.agent.records import CLASS_SETS
from fedfer.agent.training.ifer import class_weights
from fedfer.agent.training.metrics import classification_report

__all__ = [
    "VferTrainConfig",
    "VferTrainResult",
    "kl_partial_loss",
    "load_vfer",
    "save_vfer",
    "soft_targets",
    "train_vfer",
]

LOG = logging.getLogger(__name__)


def soft_targets(vote_counts: np.ndarray) -> np.ndarray:
    """Partial-label targets: softmax over vote counts, with zero-vote classes masked out (probability 0).

    Raises:
        DatasetError: a row has no vote at all or a negative count.
    """
    counts = np.asarray(vote_counts, dtype=np.float64)
    if counts.ndim != 2 or np.any(counts < 0) or np.any(counts.sum(axis=1) <= 0):
        raise DatasetError("vote counts must be non-negative with at least one vote per clip")
    logits = np.where(counts > 0, counts, -np.inf)
    logits = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(logits)
    return np.asarray(e / e.sum(axis=1, keepdims=True), dtype=np.float64)


def kl_partial_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean KL(targets || softmax(logits)) over the batch (zero-probability targets contribute 0)."""
    return F.kl_div(F.log_softmax(logits, dim=1), targets, reduction="batchmean")


@dataclass(frozen=True, slots=True, kw_only=True)
class VferTrainConfig:
    """Central v training settings (paper: 20 epochs, Adam lr 1e-3, x0.5 on dev plateau).

    Attributes:
        epochs: passes over the training clips.
        lr: Adam learning rate.
        batch_size: minibatch size.
        patience: epochs without dev macro-F1 gain before halving the rate.
        seed: torch seed (not a secret).
    """

    epochs: int = 20
    lr: float = 1e-3
    batch_size: int = 32
    patience: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        if type(self.epochs) is not int or self.epochs < 1:
            raise DatasetError("epochs must be a positive int")
        if type(self.batch_size) is not int or self.batch_size < 1:
            raise DatasetError("batch_size must be a positive int")
        if not isinstance(self.lr, float) or not 0.0 < self.lr < 1.0:
            raise DatasetError("lr must be a float in (0, 1)")


@dataclass(slots=True)
class VferTrainResult:
    """What :func:`train_vfer` reports."""

    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = -1
    best_dev_macro_f1: float = 0.0
    seconds: float = 0.0


def train_vfer(
    clips: np.ndarray,
    labels: np.ndarray,
    dev_clips: np.ndarray,
    dev_labels: np.ndarray,
    *,
    num_classes: int,
    config: VferTrainConfig,
    soft: np.ndarray | None = None,
    progress: Callable[[dict[str, float]], None] | None = None,
) -> tuple[VideoModel, VferTrainResult]:
    """Train ``v`` from scratch on padded clips ``(B, T, 1280)``.

    Args:
        clips: training clips (zero pre-padded).
        labels: hard labels ``(B,)`` (also used for class weights and dev selection).
        dev_clips: dev clips.
        dev_labels: dev labels.
        num_classes: K.
        config: training settings.
        soft: optional partial-label targets ``(B, K)`` (see :func:`soft_targets`): KL loss instead of CE.
        progress: called with each epoch's record.
    """
    if len(clips) != len(labels) or len(clips) == 0 or len(dev_clips) != len(dev_labels):
        raise DatasetError("clip and label counts do not match")
    if soft is not None and soft.shape != (len(clips), num_classes):
        raise DatasetError("soft targets must have shape (clips, K)")
    torch.manual_seed(config.seed)
    t0 = time.perf_counter()
    model = VideoModel(num_classes=num_classes)
    x = torch.from_numpy(np.asarray(clips, dtype=np.float32))
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    s = torch.from_numpy(np.asarray(soft, dtype=np.float32)) if soft is not None else None
    ce = nn.CrossEntropyLoss(weight=class_weights(np.asarray(labels), num_classes))
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=0.5, patience=config.patience)
    result = VferTrainResult()
    best: dict[str, np.ndarray] | None = None
    classes = CLASS_SETS[num_classes]
    for epoch in range(config.epochs):
        model.train()
        order = torch.randperm(len(x))
        total = 0.0
        for start in range(0, len(x), config.batch_size):
            idx = order[start : start + config.batch_size]
            logits = model(x[idx])
            loss = kl_partial_loss(logits, s[idx]) if s is not None else ce(logits, y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        record: dict[str, float] = {"epoch": float(epoch + 1), "loss": total / len(x)}
        if len(dev_clips):
            rep = classification_report(dev_labels, predict_clips(model, dev_clips).argmax(1), classes)
            record.update(dev_macro_f1=rep.macro_f1, dev_micro_f1=rep.micro_f1)
            sched.step(rep.macro_f1)
            if best is None or rep.macro_f1 > result.best_dev_macro_f1:
                result.best_dev_macro_f1, result.best_epoch = rep.macro_f1, epoch + 1
                best = copy.deepcopy(to_named_arrays(model))
        record["seconds"] = time.perf_counter() - t0
        result.history.append(record)
        LOG.info("vfer epoch %d loss %.4f", epoch + 1, record["loss"])
        if progress is not None:
            progress(record)
    if best is not None:
        from_named_arrays(model, best)
    result.seconds = time.perf_counter() - t0
    return model.eval(), result


def save_vfer(
    model: VideoModel,
    folder: Path,
    *,
    name: str = "vfer",
    extra: dict[str, Any] | None = None,
    storage: str = "float32",
) -> Path:
    """Export ``v`` as named arrays + manifest (the form the aggregator serves); returns the manifest path."""
    manifest: dict[str, Any] = {"kind": "vfer", "classes": list(CLASS_SETS[model.num_classes])}
    manifest.update(extra or {})
    return save_exported(folder, name, to_named_arrays(model), manifest, storage=storage)


def load_vfer(path: Path) -> VideoModel:
    """Rebuild ``v`` from :func:`save_vfer`'s export.

    Raises:
        ModelFileError: not a VFER export or arrays that do not fit.
    """
    arrays, meta = load_exported(path)
    classes = meta.get("classes")
    if meta.get("kind") != "vfer" or not isinstance(classes, list) or len(classes) not in CLASS_SETS:
        raise ModelFileError("not a VFER model export")
    model = VideoModel(num_classes=len(classes))
    from_named_arrays(model, arrays)  # ValidationError when the arrays do not fit
    return model.eval()
