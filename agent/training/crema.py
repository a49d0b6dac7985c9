"""The CREMA-D clip path: clips → per-frame features and IFER probabilities (cached by content hash) →
central v training on subject-disjoint splits, and per-subject personalization with the paper's halves.

Works on the 6-clip sample shipped here and on the full corpus from a path (``--root``): tables and splits
always come from the official CSV files.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedfer.agent.errors import DatasetError
from fedfer.agent.learning.dp import DPConfig
from fedfer.agent.learning.ledger import PrivacyBudget
from fedfer.agent.learning.personalize import PersonalizeConfig, pad_clips, personalize, predict_clips
from fedfer.agent.models.export import content_key
from fedfer.agent.models.ifer import FaceNet
from fedfer.agent.models.video import VideoModel, to_named_arrays
from fedfer.agent.records import CLASS_SETS
from fedfer.agent.training.cached import cached_arrays
from fedfer.agent.training.clips import CROP_VERSION, ClipFaces, clip_features
from fedfer.agent.training.data import (
    CremaClip,
    SubjectSplit,
    crema_vote_labels,
    read_crema_demographics,
    scan_crema_clips,
    subject_split,
)
from fedfer.agent.training.ifer import restrict_probs
from fedfer.agent.training.metrics import classification_report, subject_deltas

__all__ = ["ClipData", "corpus_features", "corpus_split", "fedavg_rounds", "personalize_subjects", "split_of"]


@dataclass(frozen=True, slots=True)
class ClipData:
    """One clip's label and per-frame arrays."""

    clip: CremaClip
    label: int | None
    features: np.ndarray
    probs: np.ndarray


def corpus_features(
    root: Path,
    net: FaceNet,
    *,
    detector: Path,
    modality: str = "face",
    num_classes: int = 6,
    fps: float = 10.0,
    progress: Callable[[int, int], None] | None = None,
) -> list[ClipData]:
    """Features and IFER probabilities for every clip under ``root`` with at least one detected face.

    Per-clip results are cached by (model weights, video bytes, fps). IFER and v share the class set: an
    IFER with more classes (7, with surprise) is restricted to the ``num_classes`` set
    (:func:`~fedfer.agent.training.ifer.restrict_probs`).

    Raises:
        DatasetError: tables/clips missing or IFER lacks some of the ``num_classes`` classes.
    """
    classes = CLASS_SETS[num_classes]
    if not set(classes) <= set(net.classes):
        raise DatasetError("IFER and v must share the class set (IFER lacks some of v's classes)")
    clips = scan_crema_clips(root)
    labels = crema_vote_labels(clips.values(), modality=modality, num_classes=num_classes)
    nk = net.inference_digest()
    out: list[ClipData] = []
    with ClipFaces.for_model(net, detector_path=detector, fps=fps) as faces:
        for i, (name, clip) in enumerate(sorted(clips.items())):
            if clip.path is None:
                continue
            video = clip.path
            digest = hashlib.sha256(video.read_bytes()).hexdigest()
            key = content_key("crema-clip/2", CROP_VERSION, nk, digest, repr(fps))

            def compute(video: Path = video) -> dict[str, np.ndarray]:
                f, p = clip_features(net, faces, video)
                return {"f": f.astype(np.float16), "p": p}

            got = cached_arrays(key, compute, sub="clips")
            if len(got["f"]):
                probs = restrict_probs(got["p"], net.classes, classes)  # identity when IFER has v's classes
                out.append(ClipData(clip, labels.get(name), got["f"].astype(np.float32), probs))
            if progress is not None:
                progress(i + 1, len(clips))
    if not out:
        raise DatasetError("no clip with a detectable face")
    return out


def _halves(items: Sequence[ClipData]) -> tuple[list[ClipData], list[ClipData]]:
    """Adaptation / test halves of one subject's clips (order by a hash of the clip name)."""
    ordered = sorted(items, key=lambda c: hashlib.sha256(c.clip.name.encode()).hexdigest())
    mid = (len(ordered) + 1) // 2
    return ordered[:mid], ordered[mid:]


def personalize_subjects(
    data: Sequence[ClipData],
    v: VideoModel,
    *,
    actors: Sequence[int] | None = None,
    config: PersonalizeConfig | None = None,
    dp: DPConfig | None = None,
    budget_dir: Path | None = None,
    epsilon_limit: float = 10.0,
) -> dict[str, Any]:
    """Per subject: adapt v on the unlabelled half of their clips, score both v's on the labelled other half.

    Returns:
        ``{"actors": [...], "subjects": subject_deltas(...), "before": report, "after": report,
        "runs": [...]}`` where ``actors`` are the subjects scored and the reports pool every subject's test
        half (the paper's Table 2 format).
    """
    num_classes = v.num_classes
    classes = CLASS_SETS[num_classes]
    by_actor: dict[int, list[ClipData]] = {}
    for c in data:
        if actors is None or c.clip.actor in actors:
            by_actor.setdefault(c.clip.actor, []).append(c)
    if not by_actor:
        raise DatasetError("no clips of the chosen subjects")
    arrays = to_named_arrays(v)
    before: dict[str, float] = {}
    after: dict[str, float] = {}
    y_all: list[int] = []
    p_before: list[int] = []
    p_after: list[int] = []
    runs: list[dict[str, Any]] = []
    for actor, clips in sorted(by_actor.items()):
        adapt, test = _halves(clips)
        test = [c for c in test if c.label is not None]
        if not adapt or not test:
            continue
        budget = None
        if dp is not None and budget_dir is not None:
            budget = PrivacyBudget(
                path=Path(budget_dir) / f"{actor}.json", epsilon_limit=epsilon_limit, delta=dp.delta
            )
        model, res = personalize(
            arrays,
            [c.features for c in adapt],
            [c.probs for c in adapt],
            num_classes=num_classes,
            config=config,
            dp=dp,
            budget=budget,
        )
        x = pad_clips([c.features for c in test])
        y = np.array([c.label for c in test], dtype=np.int64)
        pb = predict_clips(v, x).argmax(1)
        pa = predict_clips(model, x).argmax(1)
        before[str(actor)] = float((pb == y).mean())
        after[str(actor)] = float((pa == y).mean())
        y_all += y.tolist()
        p_before += pb.tolist()
        p_after += pa.tolist()
        runs.append(
            {
                "subject": actor,
                "adapt_clips": len(adapt),
                "selected": res.selected,
                "test_clips": len(test),
                "epsilon": res.epsilon,
                "seconds": res.seconds,
            }
        )
    if not runs:
        raise DatasetError("no subject has both an adaptation half and a labelled test half")
    return {
        "actors": [r["subject"] for r in runs],
        "subjects": subject_deltas(before, after),
        "before": classification_report(y_all, p_before, classes).as_dict(),
        "after": classification_report(y_all, p_after, classes).as_dict(),
        "runs": runs,
    }


def corpus_split(root: Path) -> SubjectSplit:
    """The subject-disjoint, gender-balanced actor split of the corpus at ``root`` (VideoDemographics.csv).

    On the full corpus its test part holds the paper's 31 actors: the subjects Tables 2 and 6 score.
    """
    return subject_split(read_crema_demographics(Path(root) / "VideoDemographics.csv"))


def split_of(data: Sequence[ClipData], root: Path) -> dict[str, list[ClipData]]:
    """Group labelled clips by the subject-disjoint, gender-balanced split (:func:`corpus_split`)."""
    split = corpus_split(root)
    out: dict[str, list[ClipData]] = {"train": [], "dev": [], "test": []}
    for c in data:
        if c.label is not None:
            out[split.of(c.clip.actor)].append(c)
    return out


def fedavg_rounds(
    data: Sequence[ClipData],
    v: VideoModel,
    *,
    rounds: int = 2,
    actors: Sequence[int] | None = None,
    config: PersonalizeConfig | None = None,
) -> list[dict[str, Any]]:
    """The paper's Table 6 protocol: FedAvg of personalized v's over the subjects, ``rounds`` times.

    Each round every subject personalizes the current central v on its unlabelled adaptation half; the new
    central v is the average weighted by the number of selected clips (plain mean of the arrays here; the
    deployed system computes the same mean under secure aggregation). After each round the central v is
    scored on every subject's labelled test half.

    Returns:
        One record per round (0 = before any round): ``{"round", "report", "clients"}``.
    """
    if type(rounds) is not int or rounds < 1:
        raise DatasetError("rounds must be a positive int")
    num_classes = v.num_classes
    classes = CLASS_SETS[num_classes]
    by_actor: dict[int, tuple[list[ClipData], list[ClipData]]] = {}
    for actor in sorted({c.clip.actor for c in data}):
        if actors is None or actor in actors:
            adapt, test = _halves([c for c in data if c.clip.actor == actor])
            test = [c for c in test if c.label is not None]
            if adapt and test:
                by_actor[actor] = (adapt, test)
    if not by_actor:
        raise DatasetError("no subject has both an adaptation half and a labelled test half")
    x_test = [pad_clips([c.features for c in t]) for _, t in by_actor.values()]
    y_test = np.concatenate([np.array([c.label for c in t], dtype=np.int64) for _, t in by_actor.values()])

    def score(model: VideoModel) -> dict[str, Any]:
        pred = np.concatenate([predict_clips(model, x).argmax(1) for x in x_test])
        return classification_report(y_test, pred, classes).as_dict()

    central = to_named_arrays(v)
    current = VideoModel(num_classes=num_classes)
    from fedfer.agent.models.video import from_named_arrays

    from_named_arrays(current, central)
    out: list[dict[str, Any]] = [{"round": 0, "report": score(current), "clients": 0}]
    for r in range(1, rounds + 1):
        total: dict[str, np.ndarray] = {k: np.zeros_like(a, dtype=np.float64) for k, a in central.items()}
        weight = 0
        for adapt, _ in by_actor.values():
            model, res = personalize(
                central,
                [c.features for c in adapt],
                [c.probs for c in adapt],
                num_classes=num_classes,
                config=config,
            )
            if res.selected == 0:
                continue
            for k, a in to_named_arrays(model).items():
                total[k] += res.selected * a.astype(np.float64)
            weight += res.selected
        if weight:
            central = {k: (t / weight).astype(np.float32) for k, t in total.items()}
        from_named_arrays(current, central)
        out.append({"round": r, "report": score(current), "clients": len(by_actor)})
    return out
