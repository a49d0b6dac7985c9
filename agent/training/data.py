"""Dataset readers: ImageFolder-style face images (FER2013 layout) and the CREMA-D corpus layout.

CREMA-D: file names read ``ActorID_Sentence_Emotion_Level``; ``summaryTable.csv`` holds the crowd's plurality
vote per modality (``VoiceVote``, ``FaceVote``, ``MultiModalVote``; ties are written ``A:D``) and
``VideoDemographics.csv`` each actor's sex. Splits are subject-disjoint and gender-balanced, computed from the
official tables only (so they are the same with the 6-clip sample or the full corpus).
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedfer.agent.capture.images import IMAGE_SUFFIXES
from fedfer.agent.capture.video import VIDEO_SUFFIXES
from fedfer.agent.errors import DatasetError
from fedfer.agent.records import CLASS_SETS

__all__ = [
    "CREMA_EMOTIONS",
    "CREMA_MODALITIES",
    "FOLDER_ALIASES",
    "CremaClip",
    "LabelledImage",
    "SubjectSplit",
    "crema_label",
    "crema_vote_labels",
    "list_image_folder",
    "read_crema_demographics",
    "read_crema_responses",
    "read_crema_summary",
    "read_gray",
    "scan_crema_clips",
    "subject_split",
]


# Folder names seen in the wild -> the canonical class names of fedfer.agent.records.CLASS_SETS.
FOLDER_ALIASES: dict[str, str] = {
    "angry": "anger",
    "anger": "anger",
    "disgust": "disgust",
    "disgusted": "disgust",
    "fear": "fear",
    "fearful": "fear",
    "happy": "happiness",
    "happiness": "happiness",
    "neutral": "neutral",
    "sad": "sadness",
    "sadness": "sadness",
    "surprise": "surprise",
    "surprised": "surprise",
}

# CREMA-D emotion letters (votes) and file-name codes -> canonical class names.
CREMA_EMOTIONS: dict[str, str] = {
    "A": "anger",
    "D": "disgust",
    "F": "fear",
    "H": "happiness",
    "N": "neutral",
    "S": "sadness",
    "ANG": "anger",
    "DIS": "disgust",
    "FEA": "fear",
    "HAP": "happiness",
    "NEU": "neutral",
    "SAD": "sadness",
}
CREMA_MODALITIES: dict[str, str] = {"face": "FaceVote", "voice": "VoiceVote", "audiovisual": "MultiModalVote"}


def _classes(num_classes: int) -> tuple[str, ...]:
    if type(num_classes) is not int or num_classes not in CLASS_SETS:
        raise DatasetError(f"num_classes must be one of {sorted(CLASS_SETS)}")
    return CLASS_SETS[num_classes]


@dataclass(frozen=True, slots=True)
class LabelledImage:
    """One image file with its class index in the chosen class set."""

    path: Path
    label: int


def list_image_folder(root: Path, num_classes: int) -> list[LabelledImage]:
    """Every image of an ImageFolder tree ``root/<class>/*`` whose class is in the ``num_classes`` set.

    Folder names are matched through :data:`FOLDER_ALIASES` (``angry`` → ``anger``, ...); folders outside the
    class set (e.g. ``surprise`` for 6 classes) are skipped. Order is sorted, so results are reproducible.

    Raises:
        DatasetError: ``root`` is missing, or a class of the set has no folder or no image.
    """
    root = Path(root)
    classes = _classes(num_classes)
    if not root.is_dir():
        raise DatasetError(f"image folder not found: {root}")
    by_class: dict[str, list[Path]] = {}
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        canon = FOLDER_ALIASES.get(sub.name.lower())
        if canon in classes:
            files = sorted(p for p in sub.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            by_class.setdefault(canon, []).extend(files)
    missing = [c for c in classes if not by_class.get(c)]
    if missing:
        raise DatasetError(f"image folder {root} has no images for classes {missing}")
    return [LabelledImage(p, classes.index(c)) for c in classes for p in by_class[c]]


def read_gray(path: Path) -> np.ndarray:
    """Decode an image file as uint8 grayscale ``(H, W)`` with OpenCV.

    Raises:
        DatasetError: the file is missing or not a decodable image.
    """
    import cv2

    img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if img is None:
        raise DatasetError(f"cannot decode image {Path(path).name}")
    return np.asarray(img, dtype=np.uint8)


@dataclass(frozen=True, slots=True)
class CremaClip:
    """One CREMA-D clip with its crowd votes.

    Attributes:
        name: ``ActorID_Sentence_Emotion_Level``.
        actor: actor id (``1001`` ... ``1091``).
        sentence: sentence code (``DFA``, ``IEO``, ...).
        acted: the acted emotion (canonical class name) from the file name.
        level: intensity code (``LO``, ``MD``, ``HI``, ``XX``).
        votes: modality → plurality vote string as in the table (``"H"``, ``"A:D"`` for a tie).
        path: the clip file when present under the corpus root, else ``None``.
    """

    name: str
    actor: int
    sentence: str
    acted: str
    level: str
    votes: dict[str, str]
    path: Path | None = None


def _parse_name(name: str) -> tuple[int, str, str, str]:
    parts = name.split("_")
    if len(parts) != 4 or not parts[0].isdigit() or parts[2] not in CREMA_EMOTIONS:
        raise DatasetError(f"not a CREMA-D clip name: {name!r}")
    return int(parts[0]), parts[1], CREMA_EMOTIONS[parts[2]], parts[3]


def read_crema_summary(path: Path) -> dict[str, CremaClip]:
    """Read ``summaryTable.csv``: clip name → :class:`CremaClip` (``path`` unset).

    Raises:
        DatasetError: the file is missing or lacks the expected columns.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"CREMA-D summary table not found: {path}")
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        needed = {"FileName", *CREMA_MODALITIES.values()}
        if reader.fieldnames is None or not needed <= set(reader.fieldnames):
            raise DatasetError("CREMA-D summary table lacks the FileName/*Vote columns")
        clips: dict[str, CremaClip] = {}
        for row in reader:
            actor, sentence, acted, level = _parse_name(row["FileName"])
            votes = {m: row[col].strip() for m, col in CREMA_MODALITIES.items()}
            clips[row["FileName"]] = CremaClip(row["FileName"], actor, sentence, acted, level, votes)
    if not clips:
        raise DatasetError("CREMA-D summary table is empty")
    return clips


_QUERY_TYPES = {"voice": "1", "face": "2", "audiovisual": "3"}


def read_crema_responses(
    path: Path, *, modality: str = "face", num_classes: int = 6
) -> dict[str, np.ndarray]:
    """Per-rater responses of the full corpus (``finishedResponses.csv``) → clip → vote counts ``(K,)``.

    Uses the columns ``clipName``, ``queryType`` (1 voice, 2 face, 3 audio-visual) and ``respEmo``
    (A, D, F, H, N, S) as documented with the corpus; responses outside the class set are ignored. These
    counts feed the partial-label targets of :func:`fedfer.agent.training.vfer.soft_targets`.

    Raises:
        DatasetError: the file is missing, lacks the columns, or holds an unknown emotion letter.
    """
    classes = _classes(num_classes)
    if modality not in _QUERY_TYPES:
        raise DatasetError(f"modality must be one of {sorted(_QUERY_TYPES)}")
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"CREMA-D responses file not found: {path}")
    counts: dict[str, np.ndarray] = {}
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or not {"clipName", "queryType", "respEmo"} <= set(reader.fieldnames):
            raise DatasetError("CREMA-D responses lack clipName/queryType/respEmo columns")
        for row in reader:
            if row["queryType"].strip() != _QUERY_TYPES[modality]:
                continue
            canon = CREMA_EMOTIONS.get(row["respEmo"].strip())
            if canon is None:
                raise DatasetError("unknown emotion letter in CREMA-D responses")
            vec = counts.setdefault(row["clipName"].strip(), np.zeros(len(classes), np.int64))
            if canon in classes:
                vec[classes.index(canon)] += 1
    return counts


def read_crema_demographics(path: Path) -> dict[int, str]:
    """Read ``VideoDemographics.csv``: actor id → ``"Male"``/``"Female"``.

    Raises:
        DatasetError: the file is missing or malformed.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"CREMA-D demographics table not found: {path}")
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or not {"ActorID", "Sex"} <= set(reader.fieldnames):
            raise DatasetError("CREMA-D demographics lack ActorID/Sex columns")
        out: dict[int, str] = {}
        for row in reader:
            if not row["ActorID"].isdigit() or row["Sex"] not in ("Male", "Female"):
                raise DatasetError("CREMA-D demographics row is malformed")
            out[int(row["ActorID"])] = row["Sex"]
    return out


def crema_label(vote: str, num_classes: int) -> int | None:
    """Class index of a plurality vote in the class set, or ``None`` for a tie or a class outside the set.

    Args:
        vote: the table's vote string (``"H"``; ties such as ``"A:D"`` have no single plurality).
        num_classes: 4 or 6 (CREMA-D has no surprise).
    """
    classes = _classes(num_classes)
    if ":" in vote:
        return None
    canon = CREMA_EMOTIONS.get(vote)
    if canon is None:
        raise DatasetError(f"unknown CREMA-D vote {vote!r}")
    return classes.index(canon) if canon in classes else None


def crema_vote_labels(
    clips: Iterable[CremaClip], *, modality: str = "face", num_classes: int = 6
) -> dict[str, int]:
    """Clip name → class index by plurality of ``modality`` (``face``, ``voice``, ``audiovisual``).

    Clips with a tied plurality or a class outside the set are left out.
    """
    if modality not in CREMA_MODALITIES:
        raise DatasetError(f"modality must be one of {sorted(CREMA_MODALITIES)}")
    out: dict[str, int] = {}
    for clip in clips:
        label = crema_label(clip.votes[modality], num_classes)
        if label is not None:
            out[clip.name] = label
    return out


def scan_crema_clips(root: Path) -> dict[str, CremaClip]:
    """The clips present under a CREMA-D root, joined with ``summaryTable.csv`` found in the same root.

    The root holds the video files (possibly in sub-folders such as ``VideoFlash/``) and the tables.

    Raises:
        DatasetError: missing tables, or a clip file absent from the table.
    """
    root = Path(root)
    table = read_crema_summary(root / "summaryTable.csv")
    found: dict[str, CremaClip] = {}
    for p in sorted(root.rglob("*")):
        if p.suffix.lower() in VIDEO_SUFFIXES and p.stem.count("_") == 3:
            if p.stem not in table:
                raise DatasetError(f"clip {p.name} is not in the summary table")
            c = table[p.stem]
            found[p.stem] = CremaClip(c.name, c.actor, c.sentence, c.acted, c.level, c.votes, p)
    if not found:
        raise DatasetError(f"no CREMA-D clips under {root}")
    return found


@dataclass(frozen=True, slots=True)
class SubjectSplit:
    """Subject-disjoint actor ids per split."""

    train: tuple[int, ...]
    dev: tuple[int, ...]
    test: tuple[int, ...]

    def of(self, actor: int) -> str:
        """``"train"``, ``"dev"`` or ``"test"`` for ``actor``."""
        for name in ("train", "dev", "test"):
            if actor in getattr(self, name):
                return name
        raise DatasetError(f"actor {actor} is in no split")


def subject_split(
    sexes: dict[int, str], *, fractions: Sequence[float] = (0.56, 0.10, 0.34), seed: str = "fedfer"
) -> SubjectSplit:
    """Gender-balanced, subject-disjoint train/dev/test split of the actors.

    Each sex is ordered by ``sha256(seed:actor)`` and cut at the same fractions, so every split holds both
    sexes in the corpus proportion and the split is a pure function of the table and ``seed``. The default
    fractions give the paper's 31 test actors out of CREMA-D's 91.

    Raises:
        DatasetError: fractions do not sum to 1 or a split would be empty.
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise DatasetError("fractions must be three non-negative numbers summing to 1")
    parts: dict[str, list[int]] = {"train": [], "dev": [], "test": []}
    for sex in ("Female", "Male"):
        actors = sorted(
            (a for a, s in sexes.items() if s == sex),
            key=lambda a: hashlib.sha256(f"{seed}:{a}".encode()).hexdigest(),
        )
        n = len(actors)
        n_test = round(n * fractions[2])
        n_dev = round(n * fractions[1])
        parts["test"] += actors[:n_test]
        parts["dev"] += actors[n_test : n_test + n_dev]
        parts["train"] += actors[n_test + n_dev :]
    if any(not v for v in parts.values()):
        raise DatasetError("a split would be empty; too few actors for these fractions")
    return SubjectSplit(*(tuple(sorted(parts[k])) for k in ("train", "dev", "test")))


def hash_order(items: Sequence[LabelledImage]) -> list[LabelledImage]:
    """``items`` in the SHA-256 order of their file names: a reproducible shuffle that mixes classes."""
    return sorted(items, key=lambda it: hashlib.sha256(it.path.name.encode()).hexdigest())


def dev_split(
    items: Sequence[LabelledImage], *, minimum: int = 7
) -> tuple[list[LabelledImage], list[LabelledImage]]:
    """``(dev, train)``: the first tenth (at least ``minimum``) of ``items`` in :func:`hash_order`.

    The one dev split of a training folder, shared by ``fedfer-agent train-ifer`` and ``fedfer-bench
    learning`` (so both select epochs on the same images and their recipe models share a cache key).

    Raises:
        DatasetError: fewer than two images would be left to train on.
    """
    ordered = hash_order(items)
    n_dev = max(len(ordered) // 10, minimum)
    if len(ordered) - n_dev < 2:
        raise DatasetError(f"too few images to train: {len(ordered)} with {n_dev} kept for dev")
    return ordered[:n_dev], ordered[n_dev:]
