"""The shipped IFER: pinned files refused when changed, framing and views kept in the export, float16 storage,
the views' mean feature, the framing measured on real FER2013 faces, and the class-bias calibration undone."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from fedfer.agent.errors import ModelFileError
from fedfer.agent.models.export import load_exported
from fedfer.agent.models.ifer import load_ifer, save_ifer
from fedfer.agent.models.shipped import SHIPPED_IFER, shipped_ifer, verify_shipped
from fedfer.agent.models.views import (
    PLAIN,
    Framing,
    View,
    framing_from_manifest,
    render_views,
    views_from_manifest,
)
from fedfer.agent.training.data import hash_order, list_image_folder
from fedfer.agent.training.ifer import load_images
from fedfer.agent.training.release import RELEASE_VIEWS, measure_framing, release_ifer, strip_class_bias

RECIPE7 = Path("models/fedfer-ifer-recipe7/ifer.json")
DETECTOR = Path("models/mediapipe/face_detection_short_range.tflite")


def test_the_shipped_ifer_loads_with_its_framing_and_views() -> None:
    net = load_ifer(shipped_ifer())
    assert net.classes[0] == "happiness" and len(net.classes) == 7 and net.input_size == 64
    assert net.framing is not None and 0.0 < net.framing.margin < 0.2 and -0.2 < net.framing.shift < 0.0
    assert net.views == RELEASE_VIEWS == (View(), View(flip=True))
    meta = json.loads(shipped_ifer().read_text())
    assert meta["storage"] == "float16" and meta["release"]["class_bias_removed"] is True


@pytest.mark.parametrize("name", [SHIPPED_IFER.manifest, SHIPPED_IFER.weights])
def test_a_changed_or_cut_shipped_file_is_refused_by_name(tmp_path: Path, name: str) -> None:
    root = tmp_path / "release"
    shutil.copytree(shipped_ifer().parent, root / SHIPPED_IFER.folder)
    assert verify_shipped(SHIPPED_IFER, root=root) == root / "ifer" / "ifer.json"
    target = root / "ifer" / name
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match=f"{name} does not match its pinned SHA-256"):
        shipped_ifer(root=root)
    target.write_bytes(bytes(data[: len(data) // 3]))  # truncated: still refused
    with pytest.raises(ModelFileError, match="pinned SHA-256"):
        shipped_ifer(root=root)
    target.unlink()
    with pytest.raises(ModelFileError, match=f"missing or unreadable: {name}"):
        shipped_ifer(root=root)


def test_framing_and_views_survive_an_export_and_bad_entries_are_refused(
    assets: Path, tmp_path: Path
) -> None:
    net = load_ifer(assets / RECIPE7)
    assert net.framing is None and net.views == PLAIN  # an export that states none
    net.framing, net.views = Framing(margin=0.08, shift=-0.09), (View(), View(zoom=1.1, dy=-0.05, flip=True))
    back = load_ifer(save_ifer(net, tmp_path / "m"))
    assert back.framing == net.framing and back.views == net.views
    for bad in ({"margin": 2.0}, {"margin": "x"}, [0.1]):
        with pytest.raises(ModelFileError):
            framing_from_manifest({"framing": bad})
    for bad_views in ([], [{"zoom": 9}], [{"flip": 1}], [{}] * 17, "plain"):
        with pytest.raises(ModelFileError):
            views_from_manifest({"views": bad_views})


def test_float16_storage_halves_the_file_and_reads_back_as_float32(assets: Path, tmp_path: Path) -> None:
    net = load_ifer(assets / RECIPE7)
    full = save_ifer(net, tmp_path / "f32")
    half = save_ifer(net, tmp_path / "f16", storage="float16")
    a32, _ = load_exported(full)
    a16, meta = load_exported(half)
    assert meta["storage"] == "float16"
    assert (tmp_path / "f16" / "ifer.npz").stat().st_size < 0.55 * (
        tmp_path / "f32" / "ifer.npz"
    ).stat().st_size
    assert all(a16[k].dtype == np.float32 for k in a16)
    worst = max(float(np.max(np.abs(a16[k] - a32[k]) / (np.abs(a32[k]) + 1e-3))) for k in a32)
    assert worst < 2e-3  # float16 rounding, nothing else
    faces = load_images(hash_order(list_image_folder(assets / "data/fer2013/test", 7))[:200])
    _, p32 = net.infer(faces)
    _, p16 = load_ifer(half).infer(faces)
    assert (p32.argmax(1) == p16.argmax(1)).mean() >= 0.99
    with pytest.raises(ModelFileError, match="storage"):
        save_ifer(net, tmp_path / "bad", storage="int8")


def test_the_mean_over_views_is_the_mean_of_each_views_feature(assets: Path) -> None:
    net = load_ifer(assets / RECIPE7)
    faces = load_images(hash_order(list_image_folder(assets / "data/fer2013/test", 7))[:6])
    mirrored = np.ascontiguousarray(faces[:, :, ::-1])
    f_plain, _ = net.infer(faces)
    f_mirror, _ = net.infer(mirrored)
    net.views = (View(), View(flip=True))
    f_both, p_both = net.infer(faces)
    np.testing.assert_allclose(f_both, (f_plain + f_mirror) / 2, atol=1e-4)
    with torch.inference_mode():
        expected = torch.softmax(net.head(torch.from_numpy(f_both)), 1).numpy()
    np.testing.assert_allclose(p_both, expected, atol=1e-4)  # g of the mean feature


def test_views_render_plain_resize_mirror_and_shift() -> None:
    face = np.repeat((np.arange(96) * 2).astype(np.uint8)[:, None], 96, axis=1)  # brighter downwards
    plain, mirror, up = render_views([face], (View(), View(flip=True), View(dy=-0.25)), 48)
    np.testing.assert_array_equal(plain, cv2.resize(face, (48, 48), interpolation=cv2.INTER_AREA))
    np.testing.assert_array_equal(mirror, plain[:, ::-1])
    # dy < 0 moves the window up by a quarter of the side (12 output rows): the top rows repeat the border,
    # the last row shows what plain row 35 shows.
    assert (up[:10] == face[0, 0]).all()
    assert abs(int(up[-1, 10]) - int(plain[-1 - 12, 10])) <= 2


def test_framing_measured_on_real_fer2013_faces(assets: Path) -> None:
    faces = list(load_images(hash_order(list_image_folder(assets / "data/fer2013/train", 7))[:120]))
    got = measure_framing(faces, detector=assets / DETECTOR)
    assert got.detected >= 110 and got.faces == 120
    # FER2013 faces fill most of the image and sit low in it: a tight crop, moved up.
    assert 0.75 < got.box_side < 0.95 and 0.52 < got.box_centre_y < 0.62
    assert 0.02 < got.framing.margin < 0.15 and -0.15 < got.framing.shift < -0.03


def test_release_undoes_the_class_bias_calibration_exactly(assets: Path, tmp_path: Path) -> None:
    source = assets / RECIPE7
    bias = np.array(json.loads(source.read_text())["calibration"]["class_bias"], np.float32)
    calibrated = load_ifer(source)
    out = release_ifer(source, tmp_path / "rel", framing=Framing(0.08, -0.08), storage="float32")
    released = load_ifer(out)
    diff = calibrated.head.net[-1].bias.detach().numpy() - released.head.net[-1].bias.detach().numpy()
    np.testing.assert_allclose(diff, bias, atol=1e-6)
    meta = json.loads(out.read_text())
    assert meta["release"]["class_bias_removed"] and meta["framing"] == {"margin": 0.08, "shift": -0.08}
    uncalibrated = load_ifer(source)
    assert strip_class_bias(uncalibrated, source) is True
    assert strip_class_bias(uncalibrated, out) is False  # the release states no calibration
