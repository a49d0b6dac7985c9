"""The Taiwan Corpora of Chinese Emotions (Chen, Cho & Tseng 2013) as per-person data, with a fixed protocol.

Files are ``PPTVeSS.jpg`` (``faces_256x256/``): performer ``PP`` (01-30, no 04), performance type ``T``
(0 neutral shots, 1 theatrical, 2 Ekman FACS-guided, 3 recalled personal event), view ``V`` (1 = front),
expression letter ``e`` (a calm/neutral, b happy, c sad, d angry, e disgusted, f fearful, g surprised), serial
``SS``. Nine neutral shots carry no letter (``1201002.jpg``) and no rating; they are left out.

The protocol (fixed here, so every figure in docs/learning.md is computed on the same split):

* **dev performers** 01-10 choose every method and hyper-parameter; **test performers** 11-30 are only
  reported. No performer's image ever trains the central IFER or the central v.
* one **clip** is a (performer, type, expression) group in serial order (the device's unit of data: a
  session); most are one to three images.
* per performer the unlabelled **adaptation set** is types 0, 1 and 2 and the **test set** type 3
  (:data:`FORWARD`); :data:`REVERSE` swaps them. A group never straddles the split (it has one type).
* faces go through the device's path: its MediaPipe detector, the IFER export's framing and the pipeline's
  224x224 crop (:class:`fedfer.agent.training.clips.ClipFaces`), then f and g of the export
  (:func:`photo_features`; cached by photo bytes and the model's inference digest).
* for FedAvg, each of the two groups is cut into federating and unseen performers
  (:data:`FEDERATING` / :data:`UNSEEN`): dev 01-06 federate, 07-10 unseen; test 11-22 federate, 23-30 unseen.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedfer.agent.errors import DatasetError
from fedfer.agent.models.export import content_key
from fedfer.agent.models.ifer import FaceNet
from fedfer.agent.records import CLASS_SETS
from fedfer.agent.training.cached import cached_arrays
from fedfer.agent.training.clips import ClipFaces
from fedfer.agent.training.ifer import restrict_probs
from fedfer.agent.training.people import Clip, PersonClips

__all__ = [
    "DEV_PERFORMERS",
    "EXPRESSIONS",
    "FEDERATING",
    "FORWARD",
    "REVERSE",
    "TEST_PERFORMERS",
    "UNSEEN",
    "Group",
    "Photo",
    "PhotoFeatures",
    "Split",
    "groups",
    "person_clips",
    "photo_crops",
    "photo_features",
    "scan",
]

#: Expression letters → the canonical class names of :data:`CLASS_SETS`.
EXPRESSIONS: dict[str, str] = {
    "a": "neutral",
    "b": "happiness",
    "c": "sadness",
    "d": "anger",
    "e": "disgust",
    "f": "fear",
    "g": "surprise",
}
DEV_PERFORMERS: tuple[int, ...] = tuple(p for p in range(1, 11) if p != 4)
TEST_PERFORMERS: tuple[int, ...] = tuple(range(11, 31))
FEDERATING: dict[str, tuple[int, ...]] = {"dev": (1, 2, 3, 5, 6), "test": tuple(range(11, 23))}
UNSEEN: dict[str, tuple[int, ...]] = {"dev": (7, 8, 9, 10), "test": tuple(range(23, 31))}

_NAME = re.compile(r"^(\d{2})([0-3])([1-3])([a-g])(\d{2})\.jpe?g$", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class Split:
    """Which performance types a performer adapts on and which are held out for the test."""

    name: str
    adapt: tuple[int, ...]
    test: tuple[int, ...]


FORWARD = Split("forward", adapt=(0, 1, 2), test=(3,))
REVERSE = Split("reverse", adapt=(3,), test=(0, 1, 2))


@dataclass(frozen=True, slots=True)
class Photo:
    """One labelled photo of the corpus."""

    path: Path
    performer: int
    type: int
    view: int
    expression: str  # canonical class name
    serial: int


@dataclass(frozen=True, slots=True)
class Group:
    """A (performer, type, expression) group in serial order: one clip, a session of the device."""

    performer: int
    type: int
    expression: str
    photos: tuple[Photo, ...]


def scan(root: Path, *, views: Iterable[int] = (1,)) -> list[Photo]:
    """Every labelled photo under ``root`` (the corpus folder or its ``faces_256x256`` folder), sorted.

    Raises:
        DatasetError: the folder is missing or holds no photo of the corpus' naming.
    """
    root = Path(root)
    folder = root / "faces_256x256" if (root / "faces_256x256").is_dir() else root
    if not folder.is_dir():
        raise DatasetError(f"corpus folder not found: {folder}")
    wanted = set(views)
    photos = []
    for path in sorted(folder.iterdir()):
        m = _NAME.match(path.name)
        if m is None or not path.is_file():
            continue
        performer, kind, view, letter, serial = m.groups()
        if int(view) not in wanted:
            continue
        photos.append(
            Photo(path, int(performer), int(kind), int(view), EXPRESSIONS[letter.lower()], int(serial))
        )
    if not photos:
        raise DatasetError(f"no photo named like the corpus (PPTVeSS.jpg) in {folder}")
    return photos


def groups(photos: Sequence[Photo], *, classes: Sequence[str]) -> list[Group]:
    """The photos of ``classes`` grouped into clips, sorted by (performer, type, expression)."""
    groups: dict[tuple[int, int, str], list[Photo]] = {}
    for ph in photos:
        if ph.expression in classes:
            groups.setdefault((ph.performer, ph.type, ph.expression), []).append(ph)
    return [
        Group(p, t, e, tuple(sorted(group, key=lambda ph: ph.serial)))
        for (p, t, e), group in sorted(groups.items())
    ]


@dataclass(frozen=True, slots=True)
class PhotoFeatures:
    """f's feature ``(1280,)`` and IFER's probabilities ``(K_ifer,)`` of one photo (the export's classes)."""

    photo: Photo
    features: np.ndarray
    probs: np.ndarray


#: Part of every per-photo cache key; changes whenever the photo path changes what it computes.
PHOTO_VERSION = "taiwanese-photo/1"


def photo_features(
    photos: Sequence[Photo],
    net: FaceNet,
    *,
    detector: Path,
    progress: Callable[[int, int], None] | None = None,
) -> list[PhotoFeatures]:
    """Features and IFER probabilities of every photo with a detected face (others are left out).

    Each photo is cached under (its bytes, ``net``'s inference digest: weights, framing and views).

    Raises:
        DatasetError: no face was found in any photo; a photo cannot be read.
        ModelFileError: the detector model is missing or not the pinned file.
    """
    model_key = net.inference_digest()
    runner = net.fused()
    out: list[PhotoFeatures] = []
    with ClipFaces.for_model(net, detector_path=detector) as faces:
        for i, photo in enumerate(photos):
            blob = photo.path.read_bytes()
            key = content_key(PHOTO_VERSION, model_key, hashlib.sha256(blob).hexdigest())

            def compute(photo: Photo = photo) -> dict[str, np.ndarray]:
                crop = faces.image(photo.path)
                if crop is None:
                    return {
                        "f": np.zeros((0, 1280), np.float32),
                        "p": np.zeros((0, net.num_classes), np.float32),
                    }
                f, p = runner.run(crop[None])
                return {"f": f, "p": p}

            got = cached_arrays(key, compute, sub="photos")
            if len(got["f"]):
                out.append(
                    PhotoFeatures(photo, got["f"][0].astype(np.float32), got["p"][0].astype(np.float32))
                )
            if progress is not None:
                progress(i + 1, len(photos))
    if not out:
        raise DatasetError("no face found in any photo")
    return out


def photo_crops(photos: Sequence[Photo], net: FaceNet, *, detector: Path) -> list[tuple[Photo, np.ndarray]]:
    """The device's grayscale 224x224 crop of every photo with a face, framed as ``net`` expects.

    The same crops :func:`photo_features` runs ``net`` on (not cached): for another model on the same faces,
    such as the published peer.
    """
    out = []
    with ClipFaces.for_model(net, detector_path=detector) as faces:
        for photo in photos:
            crop = faces.image(photo.path)
            if crop is not None:
                out.append((photo, crop))
    return out


def person_clips(
    feats: Sequence[PhotoFeatures], ifer_classes: Sequence[str], *, num_classes: int, split: Split
) -> list[PersonClips]:
    """Every performer's clips of the ``num_classes`` set under ``split``, as the per-person protocol's input.

    IFER probabilities (over ``ifer_classes``) are restricted to the class set; clips are the corpus groups
    (:func:`groups`) of the photos that had a face.
    """
    classes = CLASS_SETS[num_classes]
    by_photo = {f.photo: f for f in feats}
    adapt: dict[int, list[Clip]] = {}
    test: dict[int, list[Clip]] = {}
    for group in groups([f.photo for f in feats], classes=classes):
        frames = [by_photo[p] for p in group.photos]
        clip = Clip(
            np.stack([f.features for f in frames]),
            restrict_probs(np.stack([f.probs for f in frames]), ifer_classes, classes),
            classes.index(group.expression),
        )
        if group.type in split.adapt:
            adapt.setdefault(group.performer, []).append(clip)
        elif group.type in split.test:
            test.setdefault(group.performer, []).append(clip)
    performers = sorted(set(adapt) | set(test))
    return [PersonClips(f"{p:02d}", tuple(adapt.get(p, ())), tuple(test.get(p, ()))) for p in performers]
