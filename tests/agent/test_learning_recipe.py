"""The IFER training recipe on real FER2013 faces, kept tiny: augmentation, BatchNorm re-parametrization,
training on images, the fused inference copy the device runs, and the content-hash model cache."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from fedfer.agent.errors import DatasetError, ModelFileError
from fedfer.agent.models.ifer import FaceNet, load_backbone
from fedfer.agent.records import CLASS_SETS
from fedfer.agent.training.augment import FaceAugment, augment_faces
from fedfer.agent.training.checkpoint import Checkpoint
from fedfer.agent.training.data import LabelledImage, list_image_folder
from fedfer.agent.training.ifer import IferTrainConfig, load_images, train_ifer_images
from fedfer.agent.training.metrics import classification_report
from fedfer.agent.training.recipe import (
    CHECKPOINT_NAME,
    IferRecipe,
    initial_digest,
    recipe_key,
    train_or_load_ifer,
)
from fedfer.agent.vision.pipeline import ExportedIferModel

CLASS_SETS_7 = CLASS_SETS[7]
TFLITE = Path("models/mobilenet_v2_tflite/mobilenet_v2_1.0_224_quant.tflite")
NO_AUGMENT = FaceAugment(
    scale=(1.0, 1.0), shift=0.0, rotation=0.0, flip=0.0, brightness=0.0, contrast=0.0, cutout=0.0
)
TINY = IferTrainConfig(epochs=2, batch_size=8, backbone_lr=1e-3, schedule="cosine", optimizer="adamw")


@pytest.fixture(scope="module")
def items(assets: Path) -> list[LabelledImage]:
    every = list_image_folder(assets / "data" / "fer2013" / "train", 7)
    return every[::700]  # 42 real faces spread over the 7 class folders


def _net(assets: Path, *, split: int = 15, size: int = 32) -> FaceNet:
    backbone, norm = load_backbone(assets / TFLITE)
    torch.manual_seed(0)
    return FaceNet(backbone=backbone, normalization=norm, num_classes=7, input_size=size, split=split)


def test_augment_known_answer_and_ranges(items: list[LabelledImage]) -> None:
    faces = load_images(items[:6])
    # No augmentation: the warp is a bilinear resize (same pixel-centre convention as cv2.resize; the
    # outermost pixels differ: resize replicates the border, the warp reflects it).
    plain = augment_faces(faces, size=64, config=NO_AUGMENT, rng=np.random.default_rng(0))
    resized = np.stack([cv2.resize(f, (64, 64), interpolation=cv2.INTER_LINEAR) for f in faces])
    assert plain.shape == (6, 64, 64) and plain.dtype == np.uint8
    assert np.abs(plain.astype(int) - resized)[:, 1:-1, 1:-1].max() <= 1
    # A certain flip and nothing else: the mirror image.
    mirror = augment_faces(
        faces, size=64, config=dataclasses.replace(NO_AUGMENT, flip=1.0), rng=np.random.default_rng(0)
    )
    assert np.abs(mirror.astype(int) - resized[:, :, ::-1])[:, 1:-1, 1:-1].max() <= 1
    # The default ranges change every face, deterministically for a seed.
    a = augment_faces(faces, size=64, config=FaceAugment(), rng=np.random.default_rng(1))
    b = augment_faces(faces, size=64, config=FaceAugment(), rng=np.random.default_rng(1))
    np.testing.assert_array_equal(a, b)
    assert all(not np.array_equal(x, y) for x, y in zip(a, resized, strict=True))
    with pytest.raises(DatasetError):
        FaceAugment(scale=(1.2, 1.0))
    with pytest.raises(DatasetError):
        augment_faces(faces.astype(np.float32), size=64, config=FaceAugment(), rng=np.random.default_rng(0))


def test_reparametrized_batchnorm_keeps_the_function_and_trains(
    assets: Path, items: list[LabelledImage]
) -> None:
    net = _net(assets, split=14)
    faces = load_images(items)
    x = net.preprocess(faces[:8])
    with torch.inference_mode():
        before = net.eval()(x)
    # The converted weights: BN folded into the convolutions, every BN layer the identity.
    suffix_bn = [
        m for b in list(net.backbone.features)[14:] for m in b.modules() if isinstance(m, nn.BatchNorm2d)
    ]
    assert all(float(m.running_var.sub(1).abs().max()) < 1e-3 for m in suffix_bn)  # type: ignore[union-attr]
    net.train()
    assert not any(m.training for m in net.backbone.modules() if isinstance(m, nn.BatchNorm2d))
    assert net.reparametrize_batchnorm(faces) == len(suffix_bn) == 13
    with torch.inference_mode():
        after = net.eval()(x)
    torch.testing.assert_close(after, before, atol=2e-4, rtol=1e-4)  # the same function in eval mode
    assert all(float(m.running_var.sub(1).abs().max()) > 0.01 for m in suffix_bn)  # type: ignore[union-attr]
    net.train()  # now the suffix's BN layers use batch statistics; the frozen prefix's never do
    assert all(m.training for m in suffix_bn)
    prefix_bn = [
        m for b in list(net.backbone.features)[:14] for m in b.modules() if isinstance(m, nn.BatchNorm2d)
    ]
    assert prefix_bn and not any(m.training for m in prefix_bn)
    with pytest.raises(DatasetError):
        net.reparametrize_batchnorm(faces[:0])


def test_train_on_images_then_the_device_copy_gives_the_same_features(
    assets: Path, items: list[LabelledImage]
) -> None:
    net = _net(assets)
    start = {k: v.clone() for k, v in net.state_dict().items()}
    faces = load_images(items)
    labels = np.array([it.label for it in items])
    res = train_ifer_images(
        net, faces[:34], labels[:34], faces[34:], labels[34:], config=TINY, augment=FaceAugment()
    )
    assert [int(r["epoch"]) for r in res.history] == [1, 2] and 1 <= res.best_epoch <= 2
    state = net.state_dict()
    assert not torch.equal(
        state["backbone.features.16.conv.0.0.weight"], start["backbone.features.16.conv.0.0.weight"]
    )
    assert torch.equal(
        state["backbone.features.3.conv.0.0.weight"], start["backbone.features.3.conv.0.0.weight"]
    )
    assert not net.training and all(v.is_contiguous() for v in state.values())
    # The device's adapter runs the BN-folded copy on 224x224 RGB crops; the bench and the clip path call
    # infer() on grayscale faces. Same features either way (RGB crops are converted to grayscale).
    gray = np.stack([cv2.resize(f, (224, 224)) for f in faces[:3]])
    rgb = np.repeat(gray[..., None], 3, axis=3)
    device = ExportedIferModel(net)
    feats, probs = net.infer(gray)
    np.testing.assert_array_equal(device.features(rgb), feats)
    np.testing.assert_allclose(device.classify(feats), probs, rtol=1e-5, atol=1e-6)
    with torch.inference_mode():  # folding BN changes only float rounding
        plain = net.eval().features_from_prefix(net.prefix(net.preprocess(gray)))
    np.testing.assert_allclose(feats, plain.numpy(), atol=1e-3, rtol=1e-3)
    with pytest.raises(DatasetError):
        train_ifer_images(net, faces[:1], labels[:1], faces[34:], labels[34:], config=TINY, augment=None)


def _resumable_run(
    assets: Path, items: list[LabelledImage], checkpoint: Checkpoint, stop_at: int | None = None
) -> tuple[FaceNet, Any]:
    """Three augmented epochs with BatchNorm calibration; ``stop_at``: interrupted during that epoch."""
    net = _net(assets)
    faces = load_images(items)
    labels = np.array([it.label for it in items])

    def progress(record: dict[str, float]) -> None:
        if stop_at is not None and int(record["epoch"]) == stop_at:
            raise KeyboardInterrupt  # the operator's Ctrl-C (or a kill) before the epoch was saved

    res = train_ifer_images(
        net,
        faces[:34],
        labels[:34],
        faces[34:],
        labels[34:],
        config=dataclasses.replace(TINY, epochs=3),
        augment=FaceAugment(),
        calibration=16,
        progress=progress,
        checkpoint=checkpoint,
    )
    return net, res


def test_an_interrupted_training_resumes_after_its_last_epoch_and_ends_with_the_same_model(
    assets: Path, items: list[LabelledImage], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    whole, whole_res = _resumable_run(assets, items, Checkpoint(tmp_path / "whole.pt", "run"))
    assert torch.load(tmp_path / "whole.pt", weights_only=True)["epoch"] == 3

    resumed_at = Checkpoint(tmp_path / "cut.pt", "run")
    with pytest.raises(KeyboardInterrupt):
        _resumable_run(assets, items, resumed_at, stop_at=2)
    assert resumed_at.load() is not None and resumed_at.load()["epoch"] == 1  # type: ignore[index]
    with caplog.at_level("INFO", logger="fedfer.agent.training.ifer"):
        resumed, resumed_res = _resumable_run(assets, items, resumed_at)
    assert "resumed after epoch 1 of 3" in caplog.text
    assert resumed.weights_digest() == whole.weights_digest()  # bit for bit the uninterrupted model
    last = {name: torch.load(tmp_path / name, weights_only=True)["net"] for name in ("whole.pt", "cut.pt")}
    assert all(torch.equal(last["whole.pt"][k], last["cut.pt"][k]) for k in last["whole.pt"])  # epoch 3 too
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in resumed_res.history] == [
        {k: v for k, v in r.items() if k != "seconds"} for r in whole_res.history
    ]
    assert resumed_res.best_epoch == whole_res.best_epoch

    # Another run's checkpoint, and a truncated one, are ignored (with a warning): training starts over.
    for name, damage in (("other", None), ("truncated", 100)):
        path = tmp_path / f"{name}.pt"
        path.write_bytes((tmp_path / "cut.pt").read_bytes()[: damage or None])
        caplog.clear()
        with caplog.at_level("WARNING", logger="fedfer.agent.training.checkpoint"):
            again, again_res = _resumable_run(assets, items, Checkpoint(path, "run" if damage else "another"))
        assert "starting over" in caplog.text, name
        assert [int(r["epoch"]) for r in again_res.history] == [1, 2, 3]
        assert again.weights_digest() == whole.weights_digest()


def test_recipe_model_is_cached_by_content_and_reused(
    assets: Path, items: list[LabelledImage], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEDFER_CACHE", str(tmp_path / "cache"))
    recipe = IferRecipe(input_size=32, split=16, train=dataclasses.replace(TINY, epochs=1), calibration=16)
    train, dev = items[:30], items[30:]
    weights = assets / TFLITE
    net, first = train_or_load_ifer(recipe, weights=weights, train_items=train, dev_items=dev)
    assert not first.cached and first.manifest.is_file() and first.train_images == 30
    assert not (first.manifest.parent / CHECKPOINT_NAME).exists()  # removed once the model was saved
    assert first.manifest.parent.name == first.key and len(first.history) == 1

    import fedfer.agent.training.recipe as recipe_module

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("the cached model must be reused, not trained again")

    monkeypatch.setattr(recipe_module, "train_ifer_images", no_training)
    again, second = train_or_load_ifer(recipe, weights=weights, train_items=train, dev_items=dev)
    assert second.cached and second.key == first.key
    assert again.weights_digest() == net.weights_digest()
    assert second.train_seconds == pytest.approx(first.train_seconds) and second.history == first.history

    # The key covers the recipe, the data (contents and labels, train and dev) and the initial weights.
    init = initial_digest(_net(assets, split=16, size=32))
    key = recipe_key(recipe, initial=init, train_items=train, dev_items=dev)
    assert key == first.key
    relabelled = [dataclasses.replace(train[0], label=(train[0].label + 1) % 7), *train[1:]]
    other_face = tmp_path / "face.png"
    cv2.imwrite(str(other_face), 255 - load_images(train[:1])[0])
    changed = [dataclasses.replace(train[0], path=other_face), *train[1:]]
    variants = {
        recipe_key(
            dataclasses.replace(recipe, input_size=48), initial=init, train_items=train, dev_items=dev
        ),
        recipe_key(dataclasses.replace(recipe, augment=None), initial=init, train_items=train, dev_items=dev),
        recipe_key(
            dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, seed=1)),
            initial=init,
            train_items=train,
            dev_items=dev,
        ),
        recipe_key(recipe, initial=init, train_items=relabelled, dev_items=dev),
        recipe_key(recipe, initial=init, train_items=changed, dev_items=dev),
        recipe_key(recipe, initial=init, train_items=train, dev_items=dev[1:]),
        recipe_key(recipe, initial="0" * 64, train_items=train, dev_items=dev),
    }
    assert len(variants) == 7 and key not in variants

    # A corrupt cached model is refused with a clear error (never silently retrained or served).
    weights_file = first.manifest.with_suffix(".npz")
    weights_file.write_bytes(weights_file.read_bytes()[:-10])
    with pytest.raises(ModelFileError, match="digest"):
        train_or_load_ifer(recipe, weights=weights, train_items=train, dev_items=dev)
    with pytest.raises(DatasetError):
        train_or_load_ifer(recipe, weights=weights, train_items=train, dev_items=[])


def test_class_bias_undoes_an_over_predicted_class() -> None:
    from fedfer.agent.training.calibrate import fit_class_bias

    classes = CLASS_SETS_7
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 7, 700)
    logits = rng.normal(0, 1, (700, 7))
    logits[np.arange(700), labels] += 2.0
    logits[:, 5] += 1.5  # class 5 over-predicted, as class-weighted CE does with disgust
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    bias = fit_class_bias(probs, labels, classes)
    assert bias.shape == (7,) and bias.dtype == np.float32 and bias[5] < -0.5
    before = classification_report(labels, probs.argmax(1), classes).macro_f1
    after = classification_report(labels, (np.log(probs) + bias).argmax(1), classes).macro_f1
    assert after > before + 0.05
    few = np.concatenate([np.flatnonzero(labels == c)[: 12 if c else 9] for c in range(7)])
    assert not fit_class_bias(probs[few], labels[few], classes).any()  # 9 of class 0: too few to fit
    assert fit_class_bias(probs[few], labels[few], classes, min_per_class=9).any()
    perfect = np.eye(7)[labels] * 0.9 + 0.1 / 7
    assert not fit_class_bias(perfect, labels, classes).any()  # nothing to gain: no change
    with pytest.raises(ValueError):
        fit_class_bias(probs[:, :6], labels, classes)


def test_apply_class_bias_rescales_probabilities_only(assets: Path, items: list[LabelledImage]) -> None:
    from fedfer.agent.training.calibrate import apply_class_bias

    net = _net(assets, split=17, size=32)
    faces = load_images(items[:6])
    feats, probs = net.infer(faces)
    bias = np.linspace(-1, 1, 7).astype(np.float32)
    apply_class_bias(net, bias)
    feats2, probs2 = net.infer(faces)
    np.testing.assert_array_equal(feats, feats2)
    expected = probs * np.exp(bias)
    np.testing.assert_allclose(probs2, expected / expected.sum(1, keepdims=True), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="7 class offsets"):
        apply_class_bias(net, bias[:6])


def test_calibrated_export_is_fitted_on_dev_and_cached(
    assets: Path, items: list[LabelledImage], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedfer.agent.training.recipe import calibrate_or_load

    monkeypatch.setenv("FEDFER_CACHE", str(tmp_path / "cache"))
    recipe = IferRecipe(input_size=32, split=17, train=dataclasses.replace(TINY, epochs=1), calibration=16)
    train, dev = items[:28], items[28:]
    net, run = train_or_load_ifer(recipe, weights=assets / TFLITE, train_items=train, dev_items=dev)
    model, cal = calibrate_or_load(net, run, dev_items=dev, min_per_class=1)  # 14 dev faces here
    assert not cal.cached and cal.manifest.is_file() and cal.manifest != run.manifest
    assert cal.dev_macro_f1 >= cal.dev_macro_f1_before and len(cal.class_bias) == 7
    meta = json.loads(cal.manifest.read_text())
    assert meta["calibration"]["from"] == run.key and meta["dev"]["macro_f1"] == cal.dev_macro_f1
    assert meta["history"] == run.history
    # The calibrated model differs from the trained one in g's last bias only, by exactly the offsets.
    a, b = net.exported_arrays(), model.exported_arrays()
    differ = [k for k in a if not np.array_equal(a[k], b[k])]
    assert differ in ([], ["g.net.3.bias"])
    np.testing.assert_allclose(b["g.net.3.bias"] - a["g.net.3.bias"], cal.class_bias, atol=1e-6)
    again, second = calibrate_or_load(net, run, dev_items=dev, min_per_class=1)
    assert second.cached and second.manifest == cal.manifest and second.class_bias == cal.class_bias
    assert again.weights_digest() == model.weights_digest()
    zero, default = calibrate_or_load(net, run, dev_items=dev)  # 2 per class: offsets stay zero
    assert default.manifest != cal.manifest and not any(default.class_bias)
    assert zero.weights_digest() == net.weights_digest()
    with pytest.raises(DatasetError):
        calibrate_or_load(net, run, dev_items=[])
