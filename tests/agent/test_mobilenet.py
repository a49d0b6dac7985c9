"""MobileNetV2 f: torchvision layout, real TFLite-converted ImageNet weights, fidelity, determinism."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from fedfer.agent.models.extractor import FeatureExtractor, load_feature_extractor
from fedfer.agent.models.mobilenet import IMAGENET_NORMALIZATION, TF_NORMALIZATION, MobileNetV2
from fedfer.agent.models.tflite import BN_EPS, load_converted
from fedfer.agent.models.weights import WeightsError
from fedfer.security.errors import ValidationError
from tests.agent import vision_support as vs


@pytest.fixture(autouse=True)
def _single_torch_thread() -> Iterator[None]:
    with vs.one_torch_thread():
        yield


def _labels(assets: Path) -> list[str]:
    return (assets / vs.TFLITE.parent / "imagenet_labels.txt").read_text().splitlines()


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.asarray((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1))


def test_state_dict_matches_torchvision_layout() -> None:
    state = MobileNetV2().state_dict()
    # torchvision.models.mobilenet_v2(): 314 entries, 3,504,872 parameters.
    assert len(state) == 314
    assert sum(p.numel() for p in MobileNetV2().parameters()) == 3_504_872
    for key, shape in {
        "features.0.0.weight": (32, 3, 3, 3),
        "features.0.1.running_var": (32,),
        "features.1.conv.0.0.weight": (32, 1, 3, 3),
        "features.1.conv.1.weight": (16, 32, 1, 1),
        "features.1.conv.2.num_batches_tracked": (),
        "features.2.conv.0.0.weight": (96, 16, 1, 1),
        "features.2.conv.1.0.weight": (96, 1, 3, 3),
        "features.2.conv.2.weight": (24, 96, 1, 1),
        "features.2.conv.3.bias": (24,),
        "features.17.conv.2.weight": (320, 960, 1, 1),
        "features.18.0.weight": (1280, 320, 1, 1),
        "features.18.1.running_mean": (1280,),
        "classifier.1.weight": (1000, 1280),
        "classifier.1.bias": (1000,),
    }.items():
        assert tuple(state[key].shape) == shape, key
    # TF padding changes no parameter.
    assert list(MobileNetV2(tf_padding=True).state_dict()) == list(state)


def test_feature_mode_is_global_average_pool() -> None:
    torch.manual_seed(0)
    model = MobileNetV2().eval()
    x = torch.randn(2, 3, 96, 96)
    with torch.inference_mode():
        feats = model.features_of(x)
        manual = model.features(x).mean(dim=(2, 3))
        logits = model(x)
        head = model.classifier(feats)
    assert feats.shape == (2, 1280)
    torch.testing.assert_close(feats, manual, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, head)


def test_bad_configuration_and_input_rejected() -> None:
    with pytest.raises(ValidationError):
        MobileNetV2(num_classes=0)
    with pytest.raises(ValidationError):
        FeatureExtractor(model=MobileNetV2(), normalization=IMAGENET_NORMALIZATION, batch_size=0)
    fx = FeatureExtractor(model=MobileNetV2(), normalization=IMAGENET_NORMALIZATION)
    with pytest.raises(ValidationError):
        fx(np.zeros((1, 224, 224, 3), np.float32))
    with pytest.raises(ValidationError):
        fx(np.zeros((1, 112, 112, 3), np.uint8))
    assert fx(np.zeros((0, 224, 224, 3), np.uint8)).shape == (0, 1280)


def test_converted_weights_identity_batchnorm(assets: Path) -> None:
    converted = load_converted(assets / vs.TFLITE, cache_dir=vs.cache_dir())
    state = converted.state_dict
    assert set(state) == set(MobileNetV2().state_dict())
    torch.testing.assert_close(state["features.5.conv.1.1.running_var"] + BN_EPS, torch.ones(192))
    assert torch.all(state["features.5.conv.1.1.running_mean"] == 0)
    assert state["classifier.1.weight"].shape == (1000, 1280)
    assert len(converted.activation_quantization.convs) == 52
    assert len(converted.activation_quantization.adds) == 10
    # Cached by the source's SHA-256, outside the repository.
    cached = list(vs.cache_dir().glob("mobilenet_v2_tflite-7aad0c74*.pt"))
    assert len(cached) == 1


def test_reference_images_top1(assets: Path) -> None:
    labels = _labels(assets)
    fx = vs.tflite_extractor(assets)
    assert fx.normalization is TF_NORMALIZATION and fx.model.tf_padding and fx.channels_last
    images = np.stack([vs.reference_image(assets, n) for n in ("grace_hopper.bmp", "cat.bmp")])
    top1 = fx.logits(images).argmax(axis=1)
    # torchvision order: TFLite index i + 1 (index 0 is "background").
    assert [labels[i + 1] for i in top1] == ["military uniform", "Egyptian cat"]


def _interpreter_logits(assets: Path, images: np.ndarray) -> np.ndarray:
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(assets / vs.TFLITE), experimental_preserve_all_tensors=True)
    interp.allocate_tensors()
    (detail,) = [d for d in interp.get_tensor_details() if d["name"] == "MobilenetV2/Logits/Squeeze1"]
    scale, zero = detail["quantization"]
    out = []
    for image in images:
        interp.set_tensor(interp.get_input_details()[0]["index"], image[None])
        interp.invoke()
        out.append((interp.get_tensor(detail["index"])[0, 1:].astype(np.float32) - zero) * scale)
    return np.stack(out)


@pytest.mark.slow
def test_fidelity_against_tflite_interpreter_on_fer2013(assets: Path) -> None:
    faces = vs.fer_faces(assets, per_class=30)  # 210 real faces, 7 classes
    assert len(faces) >= 200
    ref = _interpreter_logits(assets, faces)
    results = {}
    for emulate in (False, True):
        ours = vs.tflite_extractor(assets, emulate=emulate).logits(faces)
        results[emulate] = ((ours.argmax(1) == ref.argmax(1)).mean(), _cosine(ours, ref).mean())
    print(
        f"\nTFLite fidelity on {len(faces)} FER2013 faces (top-1 agreement, mean logit cosine): "
        f"float {results[False]}, replayed activation quantization {results[True]}"
    )
    # Plain float network: logits track the interpreter closely; near-ties of the uint8 logits flip top-1.
    assert results[False][1] >= 0.97
    assert results[False][0] >= 0.70
    # Replaying the graph's uint8 activation rounding reproduces the interpreter's decisions.
    assert results[True][0] >= 0.90
    assert results[True][1] >= 0.99
    # Symmetric (PyTorch) padding with the TF weights is measurably wrong: the asymmetric padding matters.
    wrong = MobileNetV2(tf_padding=False)
    wrong.load_state_dict(load_converted(assets / vs.TFLITE, cache_dir=vs.cache_dir()).state_dict)
    sym = FeatureExtractor(model=wrong, normalization=TF_NORMALIZATION).logits(faces[:40])
    assert _cosine(sym, ref[:40]).mean() < results[False][1] - 0.05


def test_features_deterministic_and_layout_independent(assets: Path) -> None:
    faces = vs.fer_faces(assets, per_class=1)
    fx = vs.tflite_extractor(assets)
    a, b = fx(faces), fx(faces)
    assert a.shape == (7, 1280) and a.dtype == np.float32
    assert np.array_equal(a, b)
    # Batch composition does not change a face's feature beyond float rounding.
    single = fx(faces[:1])
    np.testing.assert_allclose(single[0], a[0], rtol=1e-3, atol=1e-3)
    # The naive path (contiguous layout, BN not folded, batch of one) computes the same function.
    naive = MobileNetV2(tf_padding=True)
    naive.load_state_dict(fx.model.state_dict())
    plain = FeatureExtractor(
        model=naive, normalization=TF_NORMALIZATION, channels_last=False, batch_size=1, fuse_batchnorm=False
    )
    np.testing.assert_allclose(plain(faces), a, rtol=1e-3, atol=1e-3)
    # Folding BN into the runner leaves the extractor's own model (what training code uses) untouched.
    assert list(fx.model.state_dict()) == list(MobileNetV2().state_dict())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in fx.model.modules())


def test_torchvision_state_dict_file_loads_with_imagenet_normalization(tmp_path: Path, assets: Path) -> None:
    state = vs.tflite_extractor(assets).model.state_dict()
    path = tmp_path / "mobilenet_v2.pth"
    torch.save(state, path)
    fx = load_feature_extractor(path)
    assert fx.normalization is IMAGENET_NORMALIZATION and not fx.model.tf_padding
    for key, value in fx.model.state_dict().items():
        assert torch.equal(value, state[key]), key
    with pytest.raises(ValidationError):
        load_feature_extractor(path, emulate_tflite_quantization=True)


def test_bad_weight_files_refused(tmp_path: Path, assets: Path) -> None:
    with pytest.raises(WeightsError):
        load_feature_extractor(tmp_path / "missing.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(WeightsError):
        load_feature_extractor(junk)
    wrong = tmp_path / "wrong.pth"
    torch.save({"features.0.0.weight": torch.zeros(1)}, wrong)
    with pytest.raises(WeightsError):
        load_feature_extractor(wrong)
    # A real TFLite model that is not a MobileNetV2 (the face detector).
    detector = tmp_path / "detector.tflite"
    shutil.copy(assets / vs.DETECTOR, detector)
    with pytest.raises(WeightsError):
        load_feature_extractor(detector, cache_dir=tmp_path / "cache")
    with pytest.raises(WeightsError):
        load_feature_extractor(assets / vs.TFLITE, sha256="00" * 32, cache_dir=vs.cache_dir())


def test_corrupt_cache_entry_is_rebuilt(tmp_path: Path, assets: Path) -> None:
    cache = tmp_path / "cache"
    first = load_converted(assets / vs.TFLITE, cache_dir=cache)
    (entry,) = cache.glob("*.pt")
    entry.write_bytes(b"corrupted")
    again = load_converted(assets / vs.TFLITE, cache_dir=cache)
    assert torch.equal(again.state_dict["classifier.1.weight"], first.state_dict["classifier.1.weight"])
    assert again.activation_quantization == first.activation_quantization
    assert entry.stat().st_size > 1_000_000


def test_converted_cache_entry_is_trusted_only_with_its_digest(
    tmp_path: Path, assets: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedfer.agent.models.weights import sha256_file

    cache = tmp_path / "cache"
    genuine = load_converted(assets / vs.TFLITE, cache_dir=cache)
    (entry,) = cache.glob("*.pt")
    sidecar = entry.with_name(entry.name + ".sha256")
    assert sidecar.read_text().strip() == sha256_file(entry)
    assert sorted(p.name for p in cache.iterdir()) == sorted([entry.name, sidecar.name])  # no temporaries
    # A well-formed entry with other weights put in its place (a valid torch file, by name only): the
    # sidecar does not match, so it is converted again instead of being loaded.
    forged = {k: v.clone() for k, v in genuine.state_dict.items()}
    forged["classifier.1.weight"] = torch.zeros_like(forged["classifier.1.weight"])
    blob = torch.load(entry, weights_only=True)
    blob["state_dict"] = forged
    torch.save(blob, entry)
    again = load_converted(assets / vs.TFLITE, cache_dir=cache)
    assert torch.equal(again.state_dict["classifier.1.weight"], genuine.state_dict["classifier.1.weight"])
    assert sidecar.read_text().strip() == sha256_file(entry)
    # A missing sidecar (e.g. a crash between the two writes) also means "convert again".
    sidecar.unlink()
    load_converted(assets / vs.TFLITE, cache_dir=cache)
    assert sidecar.read_text().strip() == sha256_file(entry)
    # A verified entry is used without converting (the interpreter is not needed on the device).
    import fedfer.agent.models.tflite as tc

    def no_conversion(path: object) -> None:
        raise AssertionError("converted although a verified entry exists")

    monkeypatch.setattr(tc, "convert_tflite", no_conversion)
    cached = load_converted(assets / vs.TFLITE, cache_dir=cache)
    assert torch.equal(cached.state_dict["classifier.1.weight"], genuine.state_dict["classifier.1.weight"])
