"""IFER = g(f(x)): training and inference of the image expression classifier.

:class:`FaceNet` is MobileNetV2 ``f`` (real ImageNet weights) split at block ``split`` into a frozen
prefix and a trainable suffix, plus the head ``g`` (:class:`agent.models.IferHead`). With ``split=19`` all
of ``f`` is frozen (the paper's setting) and only ``g`` trains; a smaller split also fine-tunes f's last
blocks centrally, which the paper allows. Two ways to train:

* :func:`train_ifer` on cached frozen-prefix activations: the prefix runs once per image (optionally also its
  mirror image) and is cached by content hash (:mod:`agent.learning.features`), so an epoch costs only the
  suffix. Cheap, but no augmentation beyond the mirror.
* :func:`train_ifer_images` on the images themselves with random augmentation
  (:mod:`agent.learning.augment`): every batch runs the whole network, so any split (down to ``split=1``,
  all of f but its first convolution) can be fine-tuned. With :meth:`FaceNet.reparametrize_batchnorm` the
  suffix's BatchNorm layers get real statistics first and then train normally.

Input faces are uint8 grayscale ``(N, H, W)`` or RGB ``(N, H, W, 3)`` of any size; RGB is converted to
grayscale (IFER is trained on grayscale faces) and faces are resized to ``input_size`` (112 by default;
FER2013 faces are only 48x48; the benchmark's recipe uses 64, :mod:`agent.learning.recipe`). Inference
(:meth:`FaceNet.infer`, :meth:`FaceNet.fused`) runs a copy with BatchNorm folded into the convolutions, in
channels-last layout.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedfer.agent.learning.augment import FaceAugment, augment_faces
from fedfer.agent.learning.checkpoint import Checkpoint
from fedfer.agent.learning.data import LabelledImage, read_gray
from fedfer.agent.learning.errors import DatasetError, ModelFileError
from fedfer.agent.learning.export import load_exported, save_exported
from fedfer.agent.learning.features import cached_arrays, content_key, files_digest, state_digest
from fedfer.agent.learning.metrics import ClassReport, classification_report
from fedfer.agent.mobilenet import MobileNetV2, Normalization, _fold_batchnorm
from fedfer.agent.models import CLASS_SETS, FEATURE_DIM, IferHead

__all__ = [
    "FaceNet",
    "IferTrainConfig",
    "IferTrainResult",
    "class_weights",
    "evaluate_ifer",
    "load_backbone",
    "load_ifer",
    "load_images",
    "prefix_activations",
    "restrict_probs",
    "save_ifer",
    "train_ifer",
    "train_ifer_images",
]

LOG = logging.getLogger(__name__)
NUM_BLOCKS = 19  # len(MobileNetV2.features)


def load_backbone(weights: Path) -> tuple[MobileNetV2, Normalization]:
    """Real ImageNet MobileNetV2 and its input normalization from a weight file (TFLite or torchvision).

    Uses :func:`agent.mobilenet.load_feature_extractor`, which pins the architecture variant to the file.
    """
    from fedfer.agent.mobilenet import load_feature_extractor

    extractor = load_feature_extractor(weights, channels_last=False)
    model = extractor.model
    for p in model.parameters():
        p.requires_grad_(True)
    return model, extractor.normalization


class FaceNet(nn.Module):
    """``g(f(x))`` with f split into a frozen prefix and a trainable suffix.

    Args:
        backbone: MobileNetV2 with real weights (owned from now on).
        normalization: the input normalization of those weights.
        num_classes: 4, 6 or 7.
        input_size: side of the square network input (faces are resized to it).
        split: index of the first trainable block of ``backbone.features`` (19 = all of f frozen).
        hidden: width of g's hidden layer.
    """

    def __init__(
        self,
        *,
        backbone: MobileNetV2,
        normalization: Normalization,
        num_classes: int,
        input_size: int = 112,
        split: int = 14,
        hidden: int = 512,
    ) -> None:
        if not isinstance(backbone, MobileNetV2):
            raise ModelFileError("backbone must be a MobileNetV2")
        if type(input_size) is not int or not 32 <= input_size <= 448 or input_size % 16:
            raise ModelFileError("input_size must be a multiple of 16 in [32, 448]")
        if type(split) is not int or not 1 <= split <= NUM_BLOCKS:
            raise ModelFileError(f"split must be an int in [1, {NUM_BLOCKS}]")
        super().__init__()
        self.num_classes = num_classes
        self.classes = CLASS_SETS.get(num_classes, ())
        self.input_size = input_size
        self.split = split
        self.normalization = normalization
        self.tf_padding = backbone.tf_padding
        self.backbone = backbone
        self.head = IferHead(num_classes=num_classes, hidden=hidden)
        self.hidden = hidden
        std = torch.tensor(normalization.std, dtype=torch.float32)
        mean = torch.tensor(normalization.mean, dtype=torch.float32)
        # CPU-only constants (not buffers: they never travel and are no part of the state dict).
        self._scale = (1.0 / (255.0 * std)).view(1, 3, 1, 1)
        self._shift = (-mean / std).view(1, 3, 1, 1)
        # Set by reparametrize_batchnorm: the suffix's BatchNorm layers then use batch statistics in training.
        self.suffix_batchnorm_trains = False
        for p in self.prefix_parameters():
            p.requires_grad_(False)

    # -- structure ---------------------------------------------------------------------------------------
    def _blocks(self, start: int, stop: int) -> list[nn.Module]:
        return list(self.backbone.features)[start:stop]

    def prefix_parameters(self) -> list[nn.Parameter]:
        """Parameters of the frozen blocks."""
        return [p for m in self._blocks(0, self.split) for p in m.parameters()]

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters that training updates: f's suffix blocks and g."""
        suffix = [p for m in self._blocks(self.split, NUM_BLOCKS) for p in m.parameters()]
        return suffix + list(self.head.parameters())

    def _suffix_batchnorms(self) -> list[nn.BatchNorm2d]:
        return [
            m
            for block in self._blocks(self.split, NUM_BLOCKS)
            for m in block.modules()
            if isinstance(m, nn.BatchNorm2d)
        ]

    def train(self, mode: bool = True) -> FaceNet:
        """Train mode for g and the suffix; the prefix stays in eval mode, and so does every BatchNorm unless
        :meth:`reparametrize_batchnorm` gave the suffix's BatchNorm layers real statistics.

        The TFLite-converted weights have BN folded into the convolutions (identity BN layers: mean 0,
        variance 1); batch statistics would discard exactly that pretrained scale and offset, so identity
        BN layers keep their running statistics (their affine parameters still learn).
        """
        super().train(mode)
        for m in self._blocks(0, self.split):
            m.eval()
        trains = set(map(id, self._suffix_batchnorms())) if self.suffix_batchnorm_trains else set()
        for m in self.backbone.modules():
            if isinstance(m, nn.BatchNorm2d) and id(m) not in trains:
                m.eval()
        return self

    def reparametrize_batchnorm(self, faces: np.ndarray, *, batch_size: int = 128) -> int:
        """Give the suffix's BatchNorm layers the statistics of ``faces`` without changing the function.

        For each BatchNorm in the trainable blocks, the per-channel mean ``mu`` and variance ``var`` of its
        input (the convolution's output) over ``faces`` become its running statistics, and its scale and
        offset are set so that the eval-mode map is exactly the one before (for the converted weights: the
        identity plus the folded bias). Training then normalizes with batch statistics as usual, which
        allows ordinary fine-tuning learning rates. Returns how many layers were re-parametrized.

        Raises:
            DatasetError: no faces.
        """
        if len(faces) == 0:
            raise DatasetError("no faces to calibrate BatchNorm on")
        layers = self._suffix_batchnorms()
        if any(m.running_mean is None or m.running_var is None for m in layers):
            raise ModelFileError("BatchNorm layers without running statistics")
        counts = dict.fromkeys(map(id, layers), 0)
        sums = {id(m): torch.zeros(m.num_features, dtype=torch.float64) for m in layers}
        squares = {id(m): torch.zeros(m.num_features, dtype=torch.float64) for m in layers}

        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            x = inputs[0].double()
            counts[id(module)] += x.shape[0] * x.shape[2] * x.shape[3]
            sums[id(module)] += x.sum(dim=(0, 2, 3))
            squares[id(module)] += (x * x).sum(dim=(0, 2, 3))

        handles = [m.register_forward_pre_hook(hook) for m in layers]
        try:
            self.eval()
            with torch.inference_mode():
                for start in range(0, len(faces), batch_size):
                    self(self.preprocess(faces[start : start + batch_size]))
        finally:
            for h in handles:
                h.remove()
        with torch.no_grad():
            for m in layers:
                mean, var = m.running_mean, m.running_var
                if mean is None or var is None:  # checked above; narrows the type
                    continue
                mu = sums[id(m)] / counts[id(m)]
                new_var = (squares[id(m)] / counts[id(m)] - mu * mu).clamp_min(0.0)
                slope = m.weight.double() / torch.sqrt(var.double() + m.eps)
                # old map: slope * (x - running_mean) + bias; the new (mu, var) give the same line.
                m.bias.copy_(m.bias.double() + slope * (mu - mean.double()))
                m.weight.copy_(slope * torch.sqrt(new_var + m.eps))
                mean.copy_(mu)
                var.copy_(new_var)
        self.suffix_batchnorm_trains = True
        return len(layers)

    # -- inference ---------------------------------------------------------------------------------------
    def preprocess(self, images: np.ndarray) -> torch.Tensor:
        """uint8 faces ``(N, H, W)`` gray or ``(N, H, W, 3)`` RGB → normalized ``(N, 3, S, S)``.

        RGB faces are converted to grayscale first: IFER is trained on grayscale faces (FER2013), and the
        device's RGB crops and the clip path's grayscale crops must give the same features. The gray level
        is replicated into the three input channels.
        """
        import cv2

        arr = np.asarray(images)
        if arr.dtype != np.uint8 or arr.ndim not in (3, 4) or (arr.ndim == 4 and arr.shape[3] != 3):
            raise DatasetError("faces must be uint8 (N, H, W) grayscale or (N, H, W, 3) RGB")
        s = self.input_size
        out = np.empty((len(arr), s, s), dtype=np.uint8)
        for i, img in enumerate(arr):
            if img.ndim == 3:
                img = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
            if img.shape[:2] != (s, s):
                interp = cv2.INTER_AREA if img.shape[0] > s else cv2.INTER_LINEAR
                img = cv2.resize(img, (s, s), interpolation=interp)
            out[i] = img
        x = torch.from_numpy(out).float().unsqueeze(1)
        return x * self._scale + self._shift

    def prefix(self, x: torch.Tensor) -> torch.Tensor:
        """Frozen-prefix activations for normalized input (pooled to 1x1 when all of f is frozen)."""
        h = nn.Sequential(*self._blocks(0, self.split))(x)
        if self.split == NUM_BLOCKS:
            h = F.adaptive_avg_pool2d(h, 1)
        return h  # type: ignore[no-any-return]

    def features_from_prefix(self, h: torch.Tensor) -> torch.Tensor:
        """f's 1,280-d feature from prefix activations."""
        if self.split < NUM_BLOCKS:
            h = nn.Sequential(*self._blocks(self.split, NUM_BLOCKS))(h)
        return torch.flatten(F.adaptive_avg_pool2d(h, 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, K)`` for normalized input ``(N, 3, S, S)``."""
        return self.head(self.features_from_prefix(self.prefix(x)))  # type: ignore[no-any-return]

    def fused(self) -> FaceNet:
        """An inference copy (eval mode, channels-last): every BatchNorm folded into its convolution.

        Same function up to float rounding, one pass fewer per convolution. What the device runs
        (:class:`agent.pipeline.ExportedIferModel`) and what :meth:`infer` uses, so v's features on the
        device are those it was trained and personalized on. Not for training or export (no BN layers).
        """
        net = FaceNet(
            backbone=_fold_batchnorm(self.backbone),
            normalization=self.normalization,
            num_classes=self.num_classes,
            input_size=self.input_size,
            split=self.split,
            hidden=self.hidden,
        )
        net.head.load_state_dict(self.head.state_dict())
        return net.eval().to(memory_format=torch.channels_last)  # type: ignore[call-overload,no-any-return]

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Features ``(N, 1280)`` and probabilities ``(N, K)`` float32 through this module as it is.

        Use on :meth:`fused` copies for speed; :meth:`infer` does both steps for a batch job.
        """
        with torch.inference_mode():
            x = self.preprocess(images).contiguous(memory_format=torch.channels_last)
            f = self.features_from_prefix(self.prefix(x))
            p = torch.softmax(self.head(f), dim=1)
            return f.float().numpy().astype(np.float32), p.float().numpy().astype(np.float32)

    def infer(self, images: np.ndarray, *, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
        """Features ``(N, 1280)`` and class probabilities ``(N, K)`` (float32) for uint8 faces.

        Runs a :meth:`fused` copy made for this call (the model itself is left as it is).
        """
        if len(images) == 0:
            return np.zeros((0, FEATURE_DIM), np.float32), np.zeros((0, self.num_classes), np.float32)
        runner = self.fused()
        feats, probs = [], []
        for start in range(0, len(images), batch_size):
            f, p = runner.run(images[start : start + batch_size])
            feats.append(f)
            probs.append(p)
        return np.concatenate(feats), np.concatenate(probs)

    def exported_arrays(self) -> dict[str, np.ndarray]:
        """What ``g(f(x))`` is made of, as named arrays: f's blocks (``f.*``) and g (``g.*``).

        MobileNetV2's ImageNet classifier is no part of f(x) and is left out, so two loads of one export give
        the same arrays (the classifier is re-initialized at random on every load).
        """
        arrays = {
            f"f.{k}": v.detach().cpu().numpy()
            for k, v in self.backbone.state_dict().items()
            if not k.startswith("classifier.")
        }
        arrays.update({f"g.{k}": v.detach().cpu().numpy() for k, v in self.head.state_dict().items()})
        return arrays

    def weights_digest(self) -> str:
        """SHA-256 over :meth:`exported_arrays`: a cache key for anything computed with this model."""
        return state_digest(self.exported_arrays())

    def identity(self) -> str:
        """Content key of the frozen prefix: its weights, input size, split and normalization."""
        prefix_state = {
            k: v.detach().cpu().numpy()
            for k, v in self.backbone.state_dict().items()
            if k.startswith("features.") and int(k.split(".")[1]) < self.split
        }
        return content_key(
            "facenet-prefix/1",
            state_digest(prefix_state),
            str(self.input_size),
            str(self.split),
            repr(self.normalization),
            str(self.tf_padding),
        )


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


def save_ifer(net: FaceNet, folder: Path, *, name: str = "ifer", extra: dict[str, Any] | None = None) -> Path:
    """Export f (all blocks) and g as named arrays plus a manifest; returns the manifest path."""
    arrays = net.exported_arrays()
    manifest: dict[str, Any] = {
        "kind": "ifer",
        "classes": list(net.classes),
        "input_size": net.input_size,
        "split": net.split,
        "hidden": net.hidden,
        "tf_padding": net.tf_padding,
        "normalization": {
            "name": net.normalization.name,
            "mean": list(net.normalization.mean),
            "std": list(net.normalization.std),
        },
    }
    manifest.update(extra or {})
    return save_exported(folder, name, arrays, manifest)


def load_ifer(path: Path) -> FaceNet:
    """Rebuild a :class:`FaceNet` from :func:`save_ifer`'s export (eval mode).

    Raises:
        ModelFileError: not an IFER export, or the arrays do not fit.
    """
    arrays, meta = load_exported(path)
    if meta.get("kind") != "ifer":
        raise ModelFileError("not an IFER model export")
    try:
        norm = meta["normalization"]
        normalization = Normalization(norm["name"], tuple(norm["mean"]), tuple(norm["std"]))
        backbone = MobileNetV2(tf_padding=bool(meta["tf_padding"]))
        f_state = {k[2:]: torch.from_numpy(v) for k, v in arrays.items() if k.startswith("f.")}
        g_state = {k[2:]: torch.from_numpy(v) for k, v in arrays.items() if k.startswith("g.")}
        missing, unexpected = backbone.load_state_dict(f_state, strict=False)
        if unexpected or any(not k.startswith("classifier.") for k in missing):
            raise ModelFileError("IFER export does not fit MobileNetV2")
        net = FaceNet(
            backbone=backbone,
            normalization=normalization,
            num_classes=len(meta["classes"]),
            input_size=int(meta["input_size"]),
            split=int(meta["split"]),
            hidden=int(meta["hidden"]),
        )
        net.head.load_state_dict(g_state, strict=True)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise ModelFileError("IFER export does not fit the model") from exc
    return net.eval()
