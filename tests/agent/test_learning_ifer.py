"""IFER on real FER2013 faces through the CLI: train-ifer (tiny subset), export, eval-ifer --json; the clip
path on the real CREMA-D sample: MediaPipe faces -> f -> IFER probabilities -> pseudo labels -> adapted v."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedfer.agent.cli import main
from fedfer.agent.errors import DatasetError, ModelFileError
from fedfer.agent.models.export import load_exported
from fedfer.agent.models.ifer import FaceNet, load_backbone, load_ifer
from fedfer.agent.models.video import VideoModel
from fedfer.agent.records import CLASS_SETS
from fedfer.agent.training.crema import corpus_features
from fedfer.agent.training.ifer import prefix_activations
from fedfer.agent.training.vfer import save_vfer


@pytest.fixture(scope="module")
def trained(assets: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ifer")
    mp = pytest.MonkeyPatch()
    mp.setenv("FEDFER_CACHE", str(out / "cache"))
    mp.setenv("FEDFER_ASSETS", str(assets))
    try:
        rc = main(
            [
                "train-ifer",
                "--data",
                str(assets / "data" / "fer2013"),
                "--classes",
                "6",
                "--limit",
                "320",
                "--epochs",
                "3",
                "--split",
                "17",
                "--out",
                str(out / "model"),
            ]
        )
    finally:
        mp.undo()
    assert rc == 0
    return out / "model" / "ifer.json"


def test_train_ifer_exports_named_arrays_with_manifest(trained: Path) -> None:
    arrays, meta = load_exported(trained)
    assert meta["kind"] == "ifer" and meta["classes"][0] == "happiness" and len(meta["classes"]) == 6
    assert meta["input_size"] == 112 and meta["split"] == 17
    assert len(meta["history"]) == 3
    # Trained, not just exported: above chance on its dev split (6 classes: chance macro F1 ~ 1/6).
    assert meta["dev"]["macro_f1"] > 1 / 6 and meta["dev"]["micro_f1"] > 1 / 6
    assert any(k.startswith("g.") for k in arrays) and any(k.startswith("f.features.18") for k in arrays)
    assert not any(k.startswith("f.classifier") for k in arrays)
    net = load_ifer(trained)
    # Two loads of one export are the same model (f's unused ImageNet classifier is not part of it).
    assert net.weights_digest() == load_ifer(trained).weights_digest()
    faces = np.random.default_rng(0).integers(0, 255, (3, 48, 48), dtype=np.uint8)
    feats, probs = net.infer(faces)
    assert feats.shape == (3, 1280) and probs.shape == (3, 6)
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)


def test_eval_ifer_json_on_real_test_images(
    trained: Path, assets: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = main(
        [
            "eval-ifer",
            "--model",
            str(trained),
            "--data",
            str(assets / "data" / "fer2013" / "test"),
            "--limit",
            "120",
            "--json",
        ]
    )
    assert rc == 0
    rep = json.loads(capsys.readouterr().out)
    assert sum(v["support"] for v in rep["per_class"].values()) == 120
    # A trained model beats chance (macro F1 ~ 1/6) and the majority class (happiness, 30 of these 120).
    assert rep["per_class"]["happiness"]["support"] == 30
    assert rep["macro_f1"] > 1 / 6 and rep["micro_f1"] > 30 / 120
    assert len(rep["per_class"]) == 6 and len(rep["confusion"]) == 6


def test_prefix_activations_are_cached_by_content(
    assets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedfer.agent.training.data import list_image_folder

    monkeypatch.setenv("FEDFER_CACHE", str(tmp_path))
    backbone, norm = load_backbone(
        assets / "models" / "mobilenet_v2_tflite" / "mobilenet_v2_1.0_224_quant.tflite"
    )
    net = FaceNet(backbone=backbone, normalization=norm, num_classes=7, split=14)
    items = list_image_folder(assets / "data" / "fer2013" / "test", 7)[:20]
    a = prefix_activations(net, items, flips=True, chunk=8)
    assert a.shape == (2, 20, 96, 7, 7) and a.dtype == np.float16
    assert len(list((tmp_path / "activations").glob("*.npz"))) == 3
    b = prefix_activations(net, items[:16], flips=True, chunk=8)  # reuses two chunks
    np.testing.assert_array_equal(a[:, :16], b)
    assert not np.array_equal(a[0], a[1])  # mirrored faces give other activations
    with pytest.raises(ModelFileError):
        FaceNet(backbone=backbone, normalization=norm, num_classes=7, split=0)


def test_crema_sample_full_clip_path(
    trained: Path,
    assets: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("FEDFER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("FEDFER_ASSETS", str(assets))
    vfer = save_vfer(VideoModel(num_classes=6), tmp_path / "v")
    root = assets / "data" / "crema-d-sample"
    args = ["personalize-corpus", "--root", str(root), "--ifer", str(trained), "--vfer", str(vfer)]
    # By default only the test-split actors are scored; the sample's one actor (1001) is a training actor.
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "no clip of the 31 test-split actors" in err and "train split" in err and "--subject" in err
    args += ["--subject", "1001", "--p-threshold", "0.0", "--json", "--plot", str(tmp_path / "p.png")]
    rc = main([*args, "--rounds", "2"])
    assert rc == 0
    result = json.loads(capsys.readouterr().out)
    assert result["actors"] == [1001] and result["actors_from"] == "--subject"
    (run,) = result["runs"]
    assert run["subject"] == 1001 and run["adapt_clips"] == 3 and run["selected"] >= 1
    assert run["test_clips"] == 3
    assert result["subjects"]["subjects"][0]["subject"] == "1001"
    rounds = result["fedavg"]  # the paper's Table 6 protocol: central v after each FedAvg round
    assert [r["round"] for r in rounds] == [0, 1, 2] and rounds[1]["clients"] == 1
    assert all(sum(v["support"] for v in r["report"]["per_class"].values()) == 3 for r in rounds)
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    # The labels are summaryTable.csv's face-only plurality (FaceVote) of each clip, not the acted emotion.
    detector = assets / "models" / "mediapipe" / "face_detection_short_range.tflite"
    data = corpus_features(root, load_ifer(trained), detector=detector)
    read = {c.clip.name: CLASS_SETS[6][c.label] for c in data if c.label is not None}
    assert read == {
        "1001_DFA_ANG_XX": "anger",
        "1001_DFA_DIS_XX": "anger",
        "1001_DFA_FEA_XX": "disgust",
        "1001_DFA_HAP_XX": "happiness",
        "1001_DFA_NEU_XX": "neutral",
        "1001_DFA_SAD_XX": "neutral",
    }
    assert all(len(c.features) >= 5 and c.features.shape[1] == 1280 for c in data)
    # Every clip produced per-frame features (cached by content hash for the next run).
    assert len(list((tmp_path / "cache" / "clips").glob("*.npz"))) == 6
    # train-vfer needs the three subject-disjoint splits: the 6-clip sample of one actor cannot provide them.
    rc = main(
        [
            "train-vfer",
            "--root",
            str(root),
            "--ifer",
            str(trained),
            "--out",
            str(tmp_path / "vv"),
            "--epochs",
            "1",
        ]
    )
    assert rc == 2
    assert "split" in capsys.readouterr().err


def test_cli_rejects_bad_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["eval-ifer", "--model", str(tmp_path / "nope.json"), "--data", str(tmp_path)])
    assert rc == 2
    assert "manifest" in capsys.readouterr().err
    with pytest.raises(DatasetError):
        from fedfer.agent.training.data import list_image_folder

        list_image_folder(tmp_path, 6)


def test_train_ifer_recipe_trains_once_then_loads_by_content_hash(
    assets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``train-ifer --recipe`` runs the benchmark's recipe (kept tiny here) and caches it by content hash."""
    monkeypatch.setenv("FEDFER_CACHE", str(tmp_path / "cache"))
    argv = ["train-ifer", "--recipe", "--data", str(assets / "data" / "fer2013"), "--classes", "6"]
    argv += ["--limit", "60", "--epochs", "1", "--batch-size", "16", "--input-size", "32", "--split", "17"]
    assert main(argv) == 0
    first = capsys.readouterr()
    manifest = Path(first.out.strip().splitlines()[-1].removeprefix("model: "))
    meta = json.loads(manifest.read_text())
    assert meta["input_size"] == 32 and meta["split"] == 17 and len(meta["classes"]) == 6
    assert meta["dev_images"] == 7 and meta["train_images"] == 53  # dev: a tenth of 60, at least 7
    assert len(meta["history"]) == 1 and "loaded the model" not in first.err
    assert "macro" in first.out  # the paper's table for the dev split
    assert main(argv) == 0
    second = capsys.readouterr()
    assert "loaded the model" in second.err and second.out.strip().endswith(str(manifest))


def test_dev_split_is_a_reproducible_disjoint_tenth(assets: Path) -> None:
    from fedfer.agent.training.data import dev_split, hash_order, list_image_folder

    items = list_image_folder(assets / "data" / "fer2013" / "train", 6)[::50]
    dev, train = dev_split(items)
    assert len(dev) == max(len(items) // 10, 7) and len(dev) + len(train) == len(items)
    assert not {it.path for it in dev} & {it.path for it in train}
    assert dev_split(list(reversed(items))) == (dev, train)  # the order given does not matter
    assert hash_order(items)[: len(dev)] == dev
    assert len({it.label for it in dev}) > 1  # the hash order mixes the class folders
    with pytest.raises(DatasetError, match="too few"):
        dev_split(items[:8])
