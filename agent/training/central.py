"""The central v every device starts from: trained on FER2013-derived clips through the shipped IFER.

No labelled video of many people is at hand, so v learns from FER2013's labelled faces (never from the
performers it is evaluated or personalized on). Each training face becomes a short "clip": its feature under
the IFER export (f's mean over the export's views, exactly what the device caches), repeated 1 to
:data:`MAX_FRAMES` times with a small per-frame jitter, so v's LSTM sees clips of several lengths as on the
device. The best epoch is chosen on FER2013's dev split (the recipe's: the first tenth of train, hash order).

Features are cached by (the IFER's inference digest, the images' contents and labels); the trained v by a
content key over those and the settings (:func:`train_or_load_central_v`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedfer.agent.errors import DatasetError
from fedfer.agent.files import cache_dir
from fedfer.agent.models.export import content_key
from fedfer.agent.models.ifer import FaceNet
from fedfer.agent.models.video import VideoModel
from fedfer.agent.records import CLASS_SETS
from fedfer.agent.training.cached import cached_arrays, files_digest
from fedfer.agent.training.data import LabelledImage
from fedfer.agent.training.ifer import load_images
from fedfer.agent.training.vfer import VferTrainConfig, load_vfer, save_vfer, train_vfer

__all__ = [
    "CENTRAL_VERSION",
    "MAX_FRAMES",
    "CentralRun",
    "image_features",
    "jittered_clips",
    "train_or_load_central_v",
]

#: Part of every cache key of a central v: bump when this module would train another v from the same inputs.
CENTRAL_VERSION = "central-v/1"
#: Longest training clip (frames).
MAX_FRAMES = 3
_JITTER = 0.05  # per-frame noise, as a fraction of each feature dimension's spread over the training set


def image_features(
    items: Sequence[LabelledImage], net: FaceNet, *, batch_size: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """Features ``(N, 1280)`` and IFER probabilities ``(N, K_ifer)`` of labelled face images (cached).

    Raises:
        DatasetError: no images, or an image cannot be read.
    """
    if not items:
        raise DatasetError("no images")
    key = content_key(
        "image-features/1",
        net.inference_digest(),
        files_digest([it.path for it in items], [it.label for it in items]),
    )

    def compute() -> dict[str, np.ndarray]:
        runner = net.fused()
        feats, probs = [], []
        for start in range(0, len(items), batch_size):
            f, p = runner.run(load_images(items[start : start + batch_size]))
            feats.append(f.astype(np.float16))
            probs.append(p)
        return {"f": np.concatenate(feats), "p": np.concatenate(probs)}

    got = cached_arrays(key, compute, sub="features")
    return got["f"].astype(np.float32), got["p"].astype(np.float32)


def jittered_clips(features: np.ndarray, *, seed: int, max_frames: int = MAX_FRAMES) -> np.ndarray:
    """``(N, max_frames, 1280)`` zero pre-padded clips: each feature repeated 1..max_frames times, jittered.

    The length and the noise are drawn from numpy's generator seeded with ``seed`` (training data, nothing
    secret); the first frame of every clip is the feature itself.
    """
    rng = np.random.default_rng(seed)
    n, d = features.shape
    spread = features.std(axis=0, keepdims=True).astype(np.float32)
    lengths = rng.integers(1, max_frames + 1, size=n)
    out = np.zeros((n, max_frames, d), np.float32)
    for t in range(max_frames):
        rows = np.flatnonzero(lengths > t)
        frame = features[rows]
        if t:
            frame = frame + _JITTER * spread * rng.standard_normal((len(rows), d)).astype(np.float32)
        out[rows, max_frames - 1 - t] = frame
    return out


@dataclass(slots=True)
class CentralRun:
    """What :func:`train_or_load_central_v` did."""

    manifest: Path
    cached: bool
    best_epoch: int
    dev_macro_f1: float
    train_clips: int


def train_or_load_central_v(
    net: FaceNet,
    *,
    train_items: Sequence[LabelledImage],
    dev_items: Sequence[LabelledImage],
    num_classes: int,
    config: VferTrainConfig | None = None,
    progress: Callable[[dict[str, float]], None] | None = None,
) -> tuple[VideoModel, CentralRun]:
    """The central v for ``num_classes`` trained on FER2013-derived clips through ``net`` (cached).

    ``train_items``/``dev_items`` carry labels in ``net``'s class set; images of classes outside the
    ``num_classes`` set are left out, and IFER probabilities are not used (v learns from the labels).

    Raises:
        DatasetError: the class sets do not fit, or no training or dev image is left.
    """
    classes = CLASS_SETS.get(num_classes)
    if classes is None or not set(classes) <= set(net.classes):
        raise DatasetError("v's classes must be a subset of the IFER's")
    cfg = config or VferTrainConfig()

    def subset(items: Sequence[LabelledImage]) -> tuple[np.ndarray, list[LabelledImage], np.ndarray]:
        rows = np.array([i for i, it in enumerate(items) if net.classes[it.label] in classes], np.int64)
        kept = [items[i] for i in rows]
        return rows, kept, np.array([classes.index(net.classes[it.label]) for it in kept], np.int64)

    rows_train, train, y_train = subset(train_items)
    rows_dev, dev, y_dev = subset(dev_items)
    if not train or not dev:
        raise DatasetError("no training or dev image of v's classes")
    key = content_key(
        CENTRAL_VERSION,
        net.inference_digest(),
        str(num_classes),
        repr(cfg),
        files_digest([it.path for it in train], [int(v) for v in y_train]),
        files_digest([it.path for it in dev], [int(v) for v in y_dev]),
    )
    folder = cache_dir("models") / f"central-v-{key}"
    manifest = folder / "vfer.json"
    if manifest.is_file():
        meta = json.loads(manifest.read_text(encoding="utf-8"))
        return load_vfer(manifest), CentralRun(
            manifest, True, int(meta["best_epoch"]), float(meta["dev_macro_f1"]), int(meta["train_clips"])
        )
    # Features of the whole sets (one cache entry for every class set), then v's classes.
    f_train = image_features(train_items, net)[0][rows_train]
    f_dev = image_features(dev_items, net)[0][rows_dev]
    clips = jittered_clips(f_train, seed=cfg.seed)
    model, res = train_vfer(
        clips,
        y_train,
        f_dev[:, None, :],
        y_dev,
        num_classes=num_classes,
        config=cfg,
        progress=progress,
    )
    extra = {
        "trained_on": "FER2013 train faces as clips of 1-3 jittered frames (central.py)",
        "ifer_inference_digest": net.inference_digest(),
        "cache_key": key,
        "best_epoch": res.best_epoch,
        "dev_macro_f1": res.best_dev_macro_f1,
        "train_clips": len(clips),
        "history": res.history,
    }
    save_vfer(model, folder, extra=extra)
    return model, CentralRun(manifest, False, res.best_epoch, res.best_dev_macro_f1, len(clips))
