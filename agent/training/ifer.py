"""Central training of IFER = g(f(x)) (the network is :class:`fedfer.agent.models.ifer.FaceNet`).

Two ways to train:

* :func:`train_ifer` on cached frozen-prefix activations: the prefix runs once per image (optionally also its
  mirror image) and is cached by content hash (:mod:`fedfer.agent.training.cached`), so an epoch costs only
  the suffix. Cheap, but no augmentation beyond the mirror.
* :func:`train_ifer_images` on the images themselves with random augmentation
  (:mod:`fedfer.agent.training.augment`): every batch runs the whole network, so any split (down to
  ``split=1``, all of f but its first convolution) can be fine-tuned. With
  :meth:`FaceNet.reparametrize_batchnorm` the suffix's BatchNorm layers get real statistics first and then
  train normally.

:func:`evaluate_ifer` gives the paper's table for cached activations, :func:`restrict_probs` maps
probabilities between class sets (e.g. a 7-class IFER where 6 classes are needed).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from fedfer.agent.errors import DatasetError
from fedfer.agent.models.export import content_key
from fedfer.agent.models.ifer import FaceNet
from fedfer.agent.training.augment import FaceAugment, augment_faces
from fedfer.agent.training.cached import cached_arrays, files_digest
from fedfer.agent.training.checkpoint import Checkpoint
from fedfer.agent.training.data import LabelledImage, read_gray
from fedfer.agent.training.metrics import ClassReport, classification_report

__all__ = [
    "IferTrainConfig",
    "IferTrainResult",
    "class_weights",
    "evaluate_ifer",
    "load_images",
    "prefix_activations",
    "restrict_probs",
    "train_ifer",
    "train_ifer_images",
]

LOG = logging.getLogger(__name__)


def restrict_probs(probs: np.ndarray, source: Sequence[str], target: Sequence[str]) -> np.ndarray:
    """Probabilities over ``source`` classes restricted to the ``target`` classes and renormalized.

    E.g. a 7-class IFER used where the 6-class set is needed (surprise dropped): the same treatment for our
    model and the peer. Works on any leading shape ``(..., len(source))``.

    Raises:
        DatasetError: a target class is not among the source classes.
    """
    missing = [c for c in target if c not in source]
    if missing:
        raise DatasetError(f"classes {missing} are not among the model's classes")
    cols = [list(source).index(c) for c in target]
    p = np.asarray(probs)[..., cols]
    return np.asarray(p / p.sum(axis=-1, keepdims=True), dtype=np.float32)


def load_images(items: Sequence[LabelledImage]) -> np.ndarray:
    """The faces of ``items`` as one uint8 grayscale stack ``(N, H, W)``.

    Raises:
        DatasetError: an image cannot be decoded, or the images differ in size.
    """
    imgs = [read_gray(it.path) for it in items]
    if len({im.shape for im in imgs}) > 1:
        raise DatasetError("images of one set must share a size")
    if not imgs:
        raise DatasetError("no images")
    return np.stack(imgs)


def prefix_activations(
    net: FaceNet,
    items: Sequence[LabelledImage],
    *,
    flips: bool,
    batch_size: int = 64,
    chunk: int = 1024,
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """Frozen-prefix activations (float16) for ``items``, cached by content hash in chunks of ``chunk``.

    Chunked caching lets an interrupted extraction resume and lets a prefix of a (shuffled) item list
    reuse the chunks of a longer one.

    Returns:
        ``(V, N, C, H, W)`` with ``V = 2`` (original, mirrored) when ``flips`` else ``V = 1``.
    """
    identity = net.identity()
    parts: list[np.ndarray] = []
    for c0 in range(0, len(items), chunk):
        part = items[c0 : c0 + chunk]
        key = content_key("prefix-acts/2", identity, files_digest(it.path for it in part), str(bool(flips)))

        def compute(part: Sequence[LabelledImage] = part) -> dict[str, np.ndarray]:
            views: list[list[np.ndarray]] = [[] for _ in range(2 if flips else 1)]
            net.eval()
            with torch.inference_mode():
                for start in range(0, len(part), batch_size):
                    imgs = load_images(part[start : start + batch_size])
                    variants = [imgs, np.ascontiguousarray(imgs[:, :, ::-1])] if flips else [imgs]
                    for v, batch in enumerate(variants):
                        x = net.preprocess(batch).contiguous(memory_format=torch.channels_last)
                        views[v].append(net.prefix(x).contiguous().numpy().astype(np.float16))
            return {"acts": np.stack([np.concatenate(v) for v in views])}

        parts.append(cached_arrays(key, compute, sub="activations")["acts"])
        if progress is not None:
            progress(min(c0 + chunk, len(items)), len(items))
    if not parts:
        raise DatasetError("no images")
    return np.concatenate(parts, axis=1)


def class_weights(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """Inverse-frequency class weights ``n / (K * count)`` (absent classes get weight 0)."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes).astype(np.float64)
    w = np.divide(len(labels), num_classes * counts, out=np.zeros(num_classes), where=counts > 0)
    return torch.tensor(w, dtype=torch.float32)


SCHEDULES = ("plateau", "cosine")
OPTIMIZERS = ("adam", "adamw")


@dataclass(frozen=True, slots=True, kw_only=True)
class IferTrainConfig:
    """Training settings (defaults: the paper's Adam lr 1e-3, x0.5 on dev plateau, class-weighted CE).

    Attributes:
        epochs: passes over the training set.
        lr: learning rate of g.
        backbone_lr: learning rate of f's trainable blocks. With identity BatchNorm (the converted weights)
            it must be small: 5e-4 wrecked the pretrained blocks in one epoch, 5e-5 fine-tunes them. After
            :meth:`FaceNet.reparametrize_batchnorm` ordinary fine-tuning rates (1e-4 .. 1e-3) work.
        batch_size: minibatch size.
        weight_decay: Adam's L2 penalty, or AdamW's decoupled decay.
        patience: ``plateau`` schedule: epochs without dev macro-F1 gain before halving the rates.
        label_smoothing: cross-entropy label smoothing.
        schedule: ``plateau`` (halve on a dev plateau) or ``cosine`` (per step, after a linear warm-up).
        warmup_epochs: ``cosine`` schedule: epochs of linear warm-up from 0.
        optimizer: ``adam`` or ``adamw``.
        seed: torch (and augmentation) seed for shuffling/initialization (not a secret).
    """

    epochs: int = 8
    lr: float = 1e-3
    backbone_lr: float = 5e-5  # small: the converted weights have BN folded in, so Adam's step sizes matter
    batch_size: int = 64
    weight_decay: float = 1e-5
    patience: int = 1
    label_smoothing: float = 0.0
    schedule: str = "plateau"
    warmup_epochs: float = 0.0
    optimizer: str = "adam"
    seed: int = 0

    def __post_init__(self) -> None:
        if type(self.epochs) is not int or self.epochs < 1:
            raise DatasetError("epochs must be a positive int")
        if type(self.batch_size) is not int or self.batch_size < 2:
            raise DatasetError("batch_size must be an int >= 2")
        if not (0 < self.lr < 1 and 0 < self.backbone_lr < 1):
            raise DatasetError("learning rates must lie in (0, 1)")
        if self.schedule not in SCHEDULES or self.optimizer not in OPTIMIZERS:
            raise DatasetError(f"schedule must be one of {SCHEDULES}, optimizer one of {OPTIMIZERS}")
        if not 0 <= self.label_smoothing < 1 or not 0 <= self.warmup_epochs < self.epochs:
            raise DatasetError("label_smoothing must lie in [0, 1), warmup_epochs in [0, epochs)")


@dataclass(slots=True)
class IferTrainResult:
    """What :func:`train_ifer` and :func:`train_ifer_images` report."""

    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = -1
    best_dev_macro_f1: float = 0.0
    seconds: float = 0.0


def _logits_from_acts(net: FaceNet, acts: np.ndarray, batch_size: int = 256) -> np.ndarray:
    net.eval()
    out = []
    with torch.inference_mode():
        for start in range(0, acts.shape[0], batch_size):
            h = torch.from_numpy(acts[start : start + batch_size].astype(np.float32))
            out.append(net.head(net.features_from_prefix(h)).numpy())
    return np.concatenate(out) if out else np.zeros((0, net.num_classes), np.float32)


def _logits_from_faces(net: FaceNet, faces: np.ndarray, batch_size: int = 256) -> np.ndarray:
    net.eval()
    out = []
    with torch.inference_mode():
        for start in range(0, len(faces), batch_size):
            x = net.preprocess(faces[start : start + batch_size])
            out.append(net(x.contiguous(memory_format=torch.channels_last)).numpy())
    return np.concatenate(out) if out else np.zeros((0, net.num_classes), np.float32)


# One epoch's minibatches: (prefix activations, labels) pairs; the prefix is frozen, so no gradient.
_Batches = Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]]


def _fit(
    net: FaceNet,
    *,
    batches: _Batches,
    steps_per_epoch: int,
    train_labels: np.ndarray,
    dev_logits: Callable[[], np.ndarray],
    dev_labels: np.ndarray,
    config: IferTrainConfig,
    progress: Callable[[dict[str, float]], None] | None,
    checkpoint: Checkpoint | None = None,
    resume: dict[str, Any] | None = None,
    rng: np.random.Generator | None = None,
) -> IferTrainResult:
    """The training loop both entry points share: class-weighted CE, schedule, best dev epoch kept.

    With ``checkpoint`` the state after every epoch is saved there; ``resume`` (a checkpoint's state) makes
    the loop continue after the epoch it was saved at, with the same random states (``rng`` is the NumPy
    generator the batches draw from), so the resumed run ends with the weights of an uninterrupted one.
    """
    t0 = time.perf_counter()
    loss_fn = nn.CrossEntropyLoss(
        weight=class_weights(train_labels, net.num_classes), label_smoothing=config.label_smoothing
    )
    head = list(net.head.parameters())
    suffix = [p for p in net.trainable_parameters() if all(p is not q for q in head)]
    groups: list[dict[str, Any]] = [{"params": head, "lr": config.lr}]
    if suffix:
        groups.append({"params": suffix, "lr": config.backbone_lr})
    opt_cls = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    opt = opt_cls(groups, weight_decay=config.weight_decay)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt, mode="max", factor=0.5, patience=config.patience
    )
    total_steps = max(config.epochs * steps_per_epoch, 1)
    warmup = config.warmup_epochs * steps_per_epoch

    def cosine(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(total_steps - warmup, 1)))

    stepper = torch.optim.lr_scheduler.LambdaLR(opt, cosine) if config.schedule == "cosine" else None
    result = IferTrainResult()
    best_state: dict[str, torch.Tensor] | None = None
    first_epoch = 0
    if resume is not None:
        net.load_state_dict(resume["net"])
        opt.load_state_dict(resume["optimizer"])
        plateau.load_state_dict(resume["plateau"])
        if stepper is not None:
            stepper.load_state_dict(resume["stepper"])
        torch.set_rng_state(resume["torch_rng"])
        if rng is not None:
            rng.bit_generator.state = resume["numpy_rng"]
        result.history = [dict(r) for r in resume["history"]]
        result.best_epoch, result.best_dev_macro_f1 = (
            int(resume["best_epoch"]),
            float(resume["best_dev_macro_f1"]),
        )
        best_state = resume["best_state"]
        first_epoch = int(resume["epoch"])
        t0 -= float(resume["seconds"])
        LOG.info("ifer training resumed after epoch %d of %d", first_epoch, config.epochs)
    for epoch in range(first_epoch, config.epochs):
        net.train()
        total, seen = 0.0, 0
        for h, y in batches():
            loss = loss_fn(net.head(net.features_from_prefix(h)), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if stepper is not None:
                stepper.step()
            total += loss.item() * len(y)
            seen += len(y)
        rep = classification_report(dev_labels, dev_logits().argmax(1), net.classes)
        if stepper is None:
            plateau.step(rep.macro_f1)
        record = {
            "epoch": float(epoch + 1),
            "loss": total / max(seen, 1),
            "dev_macro_f1": rep.macro_f1,
            "dev_micro_f1": rep.micro_f1,
            "lr": float(opt.param_groups[0]["lr"]),
            "seconds": time.perf_counter() - t0,
        }
        result.history.append(record)
        LOG.info("ifer epoch %d loss %.4f dev macro F1 %.3f", epoch + 1, record["loss"], rep.macro_f1)
        if progress is not None:
            progress(record)
        if rep.macro_f1 > result.best_dev_macro_f1 or best_state is None:
            result.best_dev_macro_f1 = rep.macro_f1
            result.best_epoch = epoch + 1
            best_state = copy.deepcopy(net.state_dict())
        if checkpoint is not None:
            checkpoint.save(
                {
                    "epoch": epoch + 1,
                    "net": net.state_dict(),
                    "optimizer": opt.state_dict(),
                    "plateau": plateau.state_dict(),
                    "stepper": stepper.state_dict() if stepper is not None else {},
                    "torch_rng": torch.get_rng_state(),
                    "numpy_rng": rng.bit_generator.state if rng is not None else {},
                    "history": result.history,
                    "best_epoch": result.best_epoch,
                    "best_dev_macro_f1": result.best_dev_macro_f1,
                    "best_state": best_state,
                    "seconds": time.perf_counter() - t0,
                    "suffix_batchnorm_trains": net.suffix_batchnorm_trains,
                }
            )
    if best_state is not None:
        net.load_state_dict(best_state)
    net.eval()
    result.seconds = time.perf_counter() - t0
    return result


def train_ifer(
    net: FaceNet,
    train_acts: np.ndarray,
    train_labels: np.ndarray,
    dev_acts: np.ndarray,
    dev_labels: np.ndarray,
    *,
    config: IferTrainConfig,
    progress: Callable[[dict[str, float]], None] | None = None,
    checkpoint: Checkpoint | None = None,
) -> IferTrainResult:
    """Train f's suffix and g on cached prefix activations; keeps the weights of the best dev epoch.

    Args:
        net: the model (updated in place).
        train_acts: ``(V, N, C, H, W)`` from :func:`prefix_activations` (V views, e.g. original + mirror).
        train_labels: ``(N,)`` class indices.
        dev_acts: ``(M, C, H, W)`` (one view).
        dev_labels: ``(M,)``.
        config: training settings.
        progress: called with each epoch's record.
        checkpoint: save the state after every epoch there, and resume from it when it holds this run's.
    """
    if train_acts.ndim != 5 or train_acts.shape[1] != len(train_labels) or len(dev_acts) != len(dev_labels):
        raise DatasetError("activation and label counts do not match")
    torch.manual_seed(config.seed)
    labels = torch.from_numpy(np.asarray(train_labels, dtype=np.int64))
    n_views, n = train_acts.shape[0], train_acts.shape[1]

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(n)
        views = torch.randint(0, n_views, (n,))
        for start in range(0, n, config.batch_size):
            idx = order[start : start + config.batch_size]
            if len(idx) < 2:
                continue
            batch = np.stack([train_acts[int(v), int(i)] for i, v in zip(idx, views[idx], strict=True)])
            yield torch.from_numpy(batch.astype(np.float32)), labels[idx]

    return _fit(
        net,
        batches=batches,
        steps_per_epoch=n // config.batch_size,
        train_labels=train_labels,
        dev_logits=lambda: _logits_from_acts(net, dev_acts),
        dev_labels=dev_labels,
        config=config,
        progress=progress,
        checkpoint=checkpoint,
        resume=checkpoint.load() if checkpoint is not None else None,
    )


def train_ifer_images(
    net: FaceNet,
    faces: np.ndarray,
    train_labels: np.ndarray,
    dev_faces: np.ndarray,
    dev_labels: np.ndarray,
    *,
    config: IferTrainConfig,
    augment: FaceAugment | None,
    reparametrize_batchnorm: bool = True,
    calibration: int = 2048,
    progress: Callable[[dict[str, float]], None] | None = None,
    checkpoint: Checkpoint | None = None,
) -> IferTrainResult:
    """Fine-tune f's suffix and g on the face images themselves, each batch freshly augmented.

    Every batch runs the whole network (the frozen prefix without gradients), so augmented views and any
    split are possible; keeps the weights of the best dev epoch (dev faces are never augmented). Runs in
    channels-last layout and hands the model back in the ordinary layout, in eval mode.

    Args:
        net: the model (updated in place).
        faces: ``(N, H, W)`` uint8 grayscale square training faces.
        train_labels: ``(N,)`` class indices.
        dev_faces: ``(M, H, W)`` uint8 dev faces (model selection only).
        dev_labels: ``(M,)``.
        config: training settings.
        augment: augmentation ranges, or ``None`` for the plain faces (resized to the input size).
        reparametrize_batchnorm: first give the suffix's BatchNorm layers the statistics of ``calibration``
            training views (:meth:`FaceNet.reparametrize_batchnorm`), so they train with batch statistics.
        calibration: how many training views calibrate BatchNorm.
        progress: called with each epoch's record.
        checkpoint: save the state after every epoch there; when it holds this run's state, training
            resumes after the saved epoch (and ends with the weights an uninterrupted run would have).
    """
    faces = np.asarray(faces)
    if faces.dtype != np.uint8 or faces.ndim != 3:
        raise DatasetError("training faces must be uint8 (N, H, W) grayscale")
    if len(faces) != len(train_labels) or len(dev_faces) != len(dev_labels):
        raise DatasetError("face and label counts do not match")
    if len(faces) < 2:
        raise DatasetError("need at least two training faces")
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    size = net.input_size
    labels = torch.from_numpy(np.asarray(train_labels, dtype=np.int64))

    def views(idx: np.ndarray) -> np.ndarray:
        if augment is None:
            return np.asarray(faces[idx], dtype=np.uint8)
        return augment_faces(faces[idx], size=size, config=augment, rng=rng)

    resume = checkpoint.load() if checkpoint is not None else None
    if resume is not None:  # the saved weights already hold the calibrated statistics
        net.suffix_batchnorm_trains = bool(resume["suffix_batchnorm_trains"])
    elif reparametrize_batchnorm:
        net.reparametrize_batchnorm(views(rng.permutation(len(faces))[:calibration]))
    net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = rng.permutation(len(faces))
        for start in range(0, len(order) - 1, config.batch_size):
            idx = order[start : start + config.batch_size]
            if len(idx) < 2:
                continue
            x = net.preprocess(views(idx)).contiguous(memory_format=torch.channels_last)
            with torch.no_grad():
                h = net.prefix(x)
            yield h, labels[torch.from_numpy(idx)]

    try:
        return _fit(
            net,
            batches=batches,
            steps_per_epoch=len(faces) // config.batch_size,
            train_labels=train_labels,
            dev_logits=lambda: _logits_from_faces(net, dev_faces),
            dev_labels=dev_labels,
            config=config,
            progress=progress,
            checkpoint=checkpoint,
            resume=resume,
            rng=rng,
        )
    finally:
        net.to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]


def evaluate_ifer(net: FaceNet, acts: np.ndarray, labels: np.ndarray) -> tuple[ClassReport, np.ndarray]:
    """Report and probabilities ``(N, K)`` on cached single-view prefix activations ``(N, C, H, W)``."""
    logits = _logits_from_acts(net, acts)
    probs = torch.softmax(torch.from_numpy(logits), dim=1).numpy()
    return classification_report(labels, probs.argmax(1), net.classes), probs
