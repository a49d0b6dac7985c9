"""The central IFER recipe (what ``fedfer-bench learning`` trains) and its content-addressed model cache.

A trained model is stored under ``<cache>/models/<key>/ifer.json`` (an export of
:func:`fedfer.agent.models.ifer.save_ifer`), where ``key`` is a SHA-256 over everything that decides it:

* the recipe (every setting, nested ones included, through the dataclasses' ``repr``) and
  :data:`RECIPE_VERSION`, which changes whenever the training code would produce a different model from
  the same settings;
* the initial weights (f's ImageNet weights as loaded, before any training);
* the data: the contents and labels of the training and the dev images, in order.

So the next run with the same inputs loads the model instead of training it again, and any change to data,
settings, code version or initial weights trains a new one. While a model trains, the state after every
epoch is kept in ``<key>/checkpoint.pt`` (:mod:`fedfer.agent.training.checkpoint`): a run that was interrupted
resumes after its last finished epoch and ends with the same model.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedfer.agent.errors import DatasetError
from fedfer.agent.files import cache_dir
from fedfer.agent.models.export import content_key, state_digest
from fedfer.agent.models.ifer import FaceNet, load_backbone, load_ifer, save_ifer
from fedfer.agent.training.augment import FaceAugment
from fedfer.agent.training.cached import files_digest
from fedfer.agent.training.checkpoint import Checkpoint
from fedfer.agent.training.data import LabelledImage
from fedfer.agent.training.ifer import IferTrainConfig, load_images, train_ifer_images

__all__ = [
    "CHECKPOINT_NAME",
    "RECIPE_VERSION",
    "Calibrated",
    "IferRecipe",
    "IferRun",
    "calibrate_or_load",
    "initial_digest",
    "recipe_key",
    "train_or_load_ifer",
]

#: Bump when the training code changes what a recipe produces (it is part of every cache key).
RECIPE_VERSION = "ifer-recipe/1"
#: The per-epoch checkpoint of a training in progress, in the key's folder (removed once the model is saved).
CHECKPOINT_NAME = "checkpoint.pt"


def _default_train() -> IferTrainConfig:
    return IferTrainConfig(
        epochs=15,
        lr=1e-3,
        backbone_lr=5e-4,
        batch_size=64,
        weight_decay=0.05,
        label_smoothing=0.1,
        schedule="cosine",
        warmup_epochs=1.0,
        optimizer="adamw",
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class IferRecipe:
    """How the central IFER model is trained (all of it enters the cache key).

    Attributes:
        num_classes: 4, 6 or 7.
        input_size: network input side (the device runs f at this size too).
        split: first fine-tuned MobileNetV2 block (1 = all of f but its first convolution).
        hidden: width of g's hidden layer.
        train: optimizer, schedule, loss settings.
        augment: training augmentation, or ``None``.
        reparametrize_batchnorm: calibrate the suffix's BatchNorm layers first (see
            :meth:`fedfer.agent.models.ifer.FaceNet.reparametrize_batchnorm`).
        calibration: training views used for that calibration.
    """

    num_classes: int = 7
    input_size: int = 64
    split: int = 1
    hidden: int = 512
    train: IferTrainConfig = field(default_factory=_default_train)
    augment: FaceAugment | None = field(default_factory=FaceAugment)
    reparametrize_batchnorm: bool = True
    calibration: int = 2048


@dataclass(slots=True)
class IferRun:
    """What :func:`train_or_load_ifer` did.

    Attributes:
        key: the cache key.
        manifest: the cached export's manifest path.
        cached: the model was loaded, not trained.
        seconds: wall time of this call (training, or loading).
        train_seconds: wall time the training took (now or when it was cached).
        history: per-epoch records of the training.
        best_epoch: the epoch whose weights were kept (best dev macro F1).
        train_images: training images (dev excluded).
    """

    key: str
    manifest: Path
    cached: bool
    seconds: float
    train_seconds: float
    history: list[dict[str, float]]
    best_epoch: int
    train_images: int


def _fresh(recipe: IferRecipe, weights: Path) -> FaceNet:
    backbone, norm = load_backbone(weights)
    return FaceNet(
        backbone=backbone,
        normalization=norm,
        num_classes=recipe.num_classes,
        input_size=recipe.input_size,
        split=recipe.split,
        hidden=recipe.hidden,
    )


def initial_digest(net: FaceNet) -> str:
    """SHA-256 of f's initial weights (g's random initialization is fixed by the recipe's seed)."""
    return state_digest({k: v for k, v in net.exported_arrays().items() if k.startswith("f.")})


def recipe_key(
    recipe: IferRecipe,
    *,
    initial: str,
    train_items: Sequence[LabelledImage],
    dev_items: Sequence[LabelledImage],
) -> str:
    """The cache key of the model ``recipe`` trains from ``initial`` (:func:`initial_digest`) on the data."""
    return content_key(
        RECIPE_VERSION,
        repr(recipe),
        initial,
        files_digest([it.path for it in train_items], [it.label for it in train_items]),
        files_digest([it.path for it in dev_items], [it.label for it in dev_items]),
    )


def train_or_load_ifer(
    recipe: IferRecipe,
    *,
    weights: Path,
    train_items: Sequence[LabelledImage],
    dev_items: Sequence[LabelledImage],
    progress: Callable[[dict[str, float]], None] | None = None,
) -> tuple[FaceNet, IferRun]:
    """The model ``recipe`` trains on ``train_items`` (``dev_items`` select the best epoch), cached.

    Args:
        recipe: the training recipe.
        weights: f's ImageNet weight file (TFLite or torchvision).
        train_items: labelled training faces (never test images).
        dev_items: labelled dev faces, disjoint from ``train_items``.
        progress: called with each epoch's record when training.

    Raises:
        DatasetError: no training or no dev images, or labels outside the recipe's classes.
        ModelFileError: a cached export under the key is corrupt (delete its folder to retrain).
    """
    if not train_items or not dev_items:
        raise DatasetError("need training and dev images")
    if any(not 0 <= it.label < recipe.num_classes for it in (*train_items, *dev_items)):
        raise DatasetError("labels outside the recipe's classes")
    import torch

    t0 = time.perf_counter()
    torch.manual_seed(recipe.train.seed)  # fixes g's initialization
    net = _fresh(recipe, weights)
    key = recipe_key(recipe, initial=initial_digest(net), train_items=train_items, dev_items=dev_items)
    folder = cache_dir("models") / key
    manifest = folder / "ifer.json"
    if manifest.is_file():
        model = load_ifer(manifest)  # verifies the weights against the manifest's digest
        meta = json.loads(manifest.read_text(encoding="utf-8"))
        return model, IferRun(
            key=key,
            manifest=manifest,
            cached=True,
            seconds=time.perf_counter() - t0,
            train_seconds=float(meta.get("train_seconds", 0.0)),
            history=list(meta.get("history", [])),
            best_epoch=int(meta.get("best_epoch", -1)),
            train_images=int(meta.get("train_images", len(train_items))),
        )
    # An interrupted training of this key resumes after its last finished epoch.
    checkpoint = Checkpoint(folder / CHECKPOINT_NAME, key)
    res = train_ifer_images(
        net,
        load_images(train_items),
        np.array([it.label for it in train_items]),
        load_images(dev_items),
        np.array([it.label for it in dev_items]),
        config=recipe.train,
        augment=recipe.augment,
        reparametrize_batchnorm=recipe.reparametrize_batchnorm,
        calibration=recipe.calibration,
        progress=progress,
        checkpoint=checkpoint,
    )
    extra: dict[str, Any] = {
        "history": res.history,
        "best_epoch": res.best_epoch,
        "best_dev_macro_f1": res.best_dev_macro_f1,
        "dev": {  # the same summary train-ifer writes
            "macro_f1": res.best_dev_macro_f1,
            "micro_f1": res.history[res.best_epoch - 1]["dev_micro_f1"],
        },
        "train_seconds": res.seconds,
        "train_images": len(train_items),
        "dev_images": len(dev_items),
        "recipe": repr(recipe),
        "recipe_version": RECIPE_VERSION,
        "cache_key": key,
    }
    save_ifer(net, folder, extra=extra)
    checkpoint.remove()
    return net, IferRun(
        key=key,
        manifest=manifest,
        cached=False,
        seconds=time.perf_counter() - t0,
        train_seconds=res.seconds,
        history=res.history,
        best_epoch=res.best_epoch,
        train_images=len(train_items),
    )


@dataclass(slots=True)
class Calibrated:
    """What :func:`calibrate_or_load` did.

    Attributes:
        manifest: the calibrated export's manifest path.
        cached: it was loaded, not fitted now.
        class_bias: the per-class logit offsets folded into g.
        dev_macro_f1_before: dev macro F1 of the model as trained.
        dev_macro_f1: dev macro F1 after calibration.
    """

    manifest: Path
    cached: bool
    class_bias: list[float]
    dev_macro_f1_before: float
    dev_macro_f1: float


def calibrate_or_load(
    net: FaceNet, run: IferRun, *, dev_items: Sequence[LabelledImage], min_per_class: int = 10
) -> tuple[FaceNet, Calibrated]:
    """``net`` (trained by :func:`train_or_load_ifer` as ``run``) with g's class biases fitted on dev.

    See :mod:`fedfer.agent.training.calibrate`. The export is cached beside the trained one, under
    ``<run.key>-<sha256(CALIBRATION_VERSION, run.key, dev data, min_per_class)>``; ``net`` is left as it is.
    With fewer than ``min_per_class`` dev images of a class the offsets stay zero (nothing to fit them on).

    Raises:
        DatasetError: no dev images, or labels outside the model's classes.
        ModelFileError: the cached calibrated export is corrupt (delete its folder to refit).
    """
    from fedfer.agent.training.calibrate import CALIBRATION_VERSION, apply_class_bias, fit_class_bias
    from fedfer.agent.training.metrics import classification_report

    if not dev_items or any(not 0 <= it.label < net.num_classes for it in dev_items):
        raise DatasetError("need dev images with labels in the model's classes")
    dev_key = files_digest([it.path for it in dev_items], [it.label for it in dev_items])
    fit_key = content_key(CALIBRATION_VERSION, run.key, dev_key, str(min_per_class))
    folder = cache_dir("models") / f"{run.key}-{fit_key[:16]}"
    manifest = folder / "ifer.json"
    if manifest.is_file():
        model = load_ifer(manifest)
        meta = json.loads(manifest.read_text(encoding="utf-8"))["calibration"]
        return model, Calibrated(manifest, True, meta["class_bias"], meta["dev_before"], meta["dev_after"])
    labels = np.array([it.label for it in dev_items])
    _, probs = net.infer(load_images(dev_items))
    bias = fit_class_bias(probs, labels, net.classes, min_per_class=min_per_class)
    before = classification_report(labels, probs.argmax(1), net.classes)
    model = load_ifer(run.manifest)
    apply_class_bias(model, bias)  # its probabilities are probs * exp(bias), renormalized: same argmax
    after = classification_report(labels, (np.log(np.clip(probs, 1e-12, 1.0)) + bias).argmax(1), net.classes)
    base = json.loads(run.manifest.read_text(encoding="utf-8"))
    names = ("history", "best_epoch", "train_seconds", "train_images", "recipe")
    kept = {k: base[k] for k in names if k in base}
    offsets = [float(b) for b in bias]
    calibration: dict[str, Any] = {
        "version": CALIBRATION_VERSION,
        "from": run.key,
        "class_bias": offsets,
        "dev_before": before.macro_f1,
        "dev_after": after.macro_f1,
    }
    extra = {
        **kept,
        "dev": {"macro_f1": after.macro_f1, "micro_f1": after.micro_f1},
        "dev_images": len(dev_items),
        "calibration": calibration,
    }
    save_ifer(model, folder, extra=extra)
    return model, Calibrated(manifest, False, offsets, before.macro_f1, after.macro_f1)
