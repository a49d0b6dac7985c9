"""Fixtures for the privacy audits: the audit report and realistic per-frame features.

``pytest tests/privacy --audit-report PATH`` writes every figure the audits measured as one JSON object.
Features come from real FER2013 faces through the project's MobileNetV2 ``f`` (the TFLite-converted ImageNet
weights in ``$FEDFER_ASSETS``); clips are sequences of distinct faces of one expression class. Audits that
need thousands of clips (membership inference) draw them from :class:`SyntheticFeatures`, a model fitted to
those real features (extracting a real feature costs ~0.1 s of CPU; a synthetic one microseconds).
"""

from __future__ import annotations

import datetime as dt
import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

# FER2013 folder for each class of the project's 6-class set (fedfer.agent.records.CLASS_SETS[6] order).
FER_FOLDERS = ("happy", "angry", "sad", "neutral", "fear", "disgust")
NUM_CLASSES = 6
IMAGES_PER_CLASS = 60
CLIP_LEN = 4


@pytest.fixture(scope="session")
def audit_full(request: pytest.FixtureRequest) -> bool:
    """Whether the heavier audit variants were asked for (``--audit-full``)."""
    return bool(request.config.getoption("--audit-full", default=False))


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """Audits run many tiny torch ops: one intra-op thread avoids oversubscribing the shared cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class AuditReport:
    """Collects the figures each audit measures; written as one JSON object at the end of the session."""

    def __init__(self) -> None:
        self.sections: dict[str, dict[str, Any]] = {}

    def record(self, section: str, **figures: Any) -> None:
        """Add (or extend) a section of figures."""
        self.sections.setdefault(section, {}).update(figures)

    def as_json(self) -> str:
        """The report as JSON (non-finite numbers become strings, which JSON cannot hold)."""

        def clean(value: Any) -> Any:
            if isinstance(value, dict):
                return {str(k): clean(v) for k, v in value.items()}
            if isinstance(value, list | tuple):
                return [clean(v) for v in value]
            if isinstance(value, np.generic):
                value = value.item()
            if isinstance(value, float) and not math.isfinite(value):
                return str(value)
            return value

        body = {
            "generated_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "audits": clean(self.sections),
        }
        return json.dumps(body, sort_keys=True, indent=2, allow_nan=False)


@pytest.fixture(scope="session", autouse=True)
def audit_report(request: pytest.FixtureRequest) -> Iterator[AuditReport]:
    """The session's report; written to ``--audit-report`` PATH (if given) at session end.

    (The options are registered in ``tests/conftest.py``.)
    """
    report = AuditReport()
    yield report
    path = request.config.getoption("--audit-report", default=None)
    if path:
        Path(path).write_text(report.as_json() + "\n", encoding="utf-8")


@dataclass(frozen=True)
class FeatureBank:
    """Per-image features with their class, grouped into clips on demand.

    Attributes:
        features: ``(N, 1280)`` float32.
        labels: ``(N,)`` int64 class indices in the 6-class set.
        source: where the features came from.
    """

    features: np.ndarray
    labels: np.ndarray
    source: str

    @property
    def mean(self) -> np.ndarray:
        """The population's mean feature (for centred similarities)."""
        return self.features.mean(axis=0)

    def clips(self, *, clip_len: int = CLIP_LEN, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Disjoint shuffled clips of ``clip_len`` distinct faces of one class: ``(M, T, 1280)``, ``(M,)``."""
        rng = np.random.default_rng(seed)
        clips, labels = [], []
        for k in range(NUM_CLASSES):
            idx = rng.permutation(np.flatnonzero(self.labels == k))
            for start in range(0, len(idx) - clip_len + 1, clip_len):
                clips.append(self.features[idx[start : start + clip_len]])
                labels.append(k)
        order = rng.permutation(len(clips))
        return (
            np.stack(clips)[order].astype(np.float32),
            np.asarray(labels, dtype=np.int64)[order],
        )


@pytest.fixture(scope="session")
def feature_bank(assets: Path, audit_report: AuditReport) -> FeatureBank:
    """Real MobileNetV2 features of FER2013 training faces, IMAGES_PER_CLASS per class."""
    import cv2

    from fedfer.agent.models.extractor import load_feature_extractor

    started = time.perf_counter()
    extractor = load_feature_extractor(
        assets / "models/mobilenet_v2_tflite/mobilenet_v2_1.0_224_quant.tflite", batch_size=32
    )
    rng = np.random.default_rng(2013)
    images, labels = [], []
    for k, folder in enumerate(FER_FOLDERS):
        files = sorted((assets / "data/fer2013/train" / folder).glob("*.png"))
        for i in rng.choice(len(files), size=IMAGES_PER_CLASS, replace=False):
            gray = cv2.imread(str(files[i]), cv2.IMREAD_GRAYSCALE)
            if gray is None:
                pytest.fail(f"cannot decode {files[i].name}")
            images.append(cv2.resize(cv2.cvtColor(gray, cv2.COLOR_GRAY2RGB), (224, 224)))
            labels.append(k)
    features = extractor(np.stack(images))
    bank = FeatureBank(
        features=features.astype(np.float32),
        labels=np.asarray(labels, dtype=np.int64),
        source="FER2013 train faces -> MobileNetV2 f (TFLite-converted ImageNet weights)",
    )
    audit_report.record(
        "features",
        source=bank.source,
        images=len(images),
        clip_len=CLIP_LEN,
        seconds=round(time.perf_counter() - started, 2),
        mean_norm=float(np.linalg.norm(features, axis=1).mean()),
        nonzero_fraction=float((features > 0).mean()),
    )
    return bank


SHRINK = 0.5
"""Synthetic class means sit halfway between the real class means and the grand mean (see below)."""
FLOOR = 0.2
"""Per-coordinate standard deviation of the isotropic noise added to the real within-class covariance."""


@dataclass(frozen=True)
class SyntheticFeatures:
    """Per-frame features drawn from a Gaussian model of the real feature bank, as many as needed.

    A frame of class ``k`` is ``max(0, m + SHRINK (mu_k - m) + R^T a / sqrt(n) + FLOOR e)`` with ``a`` and
    ``e`` standard normal: ``m`` is the real grand mean, ``mu_k`` the real class mean and ``R`` the ``n`` real
    within-class residuals, so frames share the real features' mean and within-class covariance (plus a
    floor that makes it full rank) and are non-negative like pooled ReLU6 activations. Class means are shrunk
    because, with 60 faces per class, about half the spread of the estimated means is estimation noise:
    unshrunk, single frames would be far easier to classify than real faces; shrunk, a linear probe on single
    frames scores about what it scores on the real faces (checked by ``test_membership.py``). A clip is
    ``clip_len`` independent frames of one class, like :meth:`FeatureBank.clips`.

    Attributes:
        grand_mean: ``(1280,)``.
        class_means: ``(K, 1280)``, already shrunk.
        residuals: ``(n, 1280)`` real within-class residuals.
    """

    grand_mean: np.ndarray
    class_means: np.ndarray
    residuals: np.ndarray

    @classmethod
    def fit(cls, bank: FeatureBank) -> SyntheticFeatures:
        """Fit the model to a bank of real features."""
        x = bank.features.astype(np.float64)
        means = np.stack([x[bank.labels == k].mean(axis=0) for k in range(NUM_CLASSES)])
        grand = x.mean(axis=0)
        return cls(
            grand_mean=grand,
            class_means=grand + SHRINK * (means - grand),
            residuals=x - means[bank.labels],
        )

    def frames(self, labels: np.ndarray, *, rng: np.random.Generator) -> np.ndarray:
        """One synthetic frame per label: ``(len(labels), 1280)`` float32."""
        n = len(self.residuals)
        mix = rng.standard_normal((len(labels), n)) / math.sqrt(n)
        noise = FLOOR * rng.standard_normal((len(labels), self.residuals.shape[1]))
        frames = self.class_means[labels] + mix @ self.residuals + noise
        return np.maximum(frames, 0.0).astype(np.float32)

    def clips(self, n: int, *, seed: int, clip_len: int = CLIP_LEN) -> tuple[np.ndarray, np.ndarray]:
        """``n`` class-balanced clips ``(n, T, 1280)`` float32 with their labels ``(n,)`` int64."""
        rng = np.random.default_rng(seed)
        labels = rng.permutation(np.arange(n) % NUM_CLASSES).astype(np.int64)
        frames = self.frames(np.repeat(labels, clip_len), rng=rng)
        return frames.reshape(n, clip_len, -1), labels


@pytest.fixture(scope="session")
def synthetic(feature_bank: FeatureBank) -> SyntheticFeatures:
    """The synthetic feature model fitted to the real feature bank."""
    return SyntheticFeatures.fit(feature_bank)


@dataclass(frozen=True)
class Population:
    """The central ``v`` every device starts from and a pool of other clips to personalize and audit on.

    Attributes:
        model: the central ``v`` (trained on ``pretrain`` clips, never on ``pool``).
        init: its named arrays.
        pool: ``(clips, labels)`` disjoint from the pretraining clips.
    """

    model: Any
    init: dict[str, np.ndarray]
    pool: tuple[np.ndarray, np.ndarray]


@pytest.fixture(scope="session")
def population(feature_bank: FeatureBank) -> Population:
    """A central ``v`` pretrained on 24 clips, and the remaining clips as the pool."""
    from fedfer.agent.models.video import to_named_arrays
    from tests.privacy.attacks import train_video_model

    clips, labels = feature_bank.clips(seed=3)
    model = train_video_model(clips[:24], labels[:24], num_classes=NUM_CLASSES, epochs=5, seed=1).model
    return Population(model=model, init=to_named_arrays(model), pool=(clips[24:88], labels[24:88]))
