"""Personalization and secure FedAvg on real people: the Taiwanese corpus through the device's path, the
fixed protocol, the per-person reports, bias-only adaptation, and SecAgg FedAvg equal to plaintext FedAvg."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from fedfer.agent.cli import main as agent_main
from fedfer.agent.errors import DatasetError
from fedfer.agent.learning.personalize import PersonalizeConfig, trainable_names
from fedfer.agent.learning.update import model_delta
from fedfer.agent.models.ifer import FaceNet, load_ifer
from fedfer.agent.models.shipped import shipped_ifer
from fedfer.agent.models.video import VideoModel, to_named_arrays
from fedfer.agent.training import taiwanese as tw
from fedfer.agent.training.clips import ClipFaces
from fedfer.agent.training.people import METHODS, PersonClips, adapt, personalize_people, secure_fedavg
from fedfer.aggregator.shipped import SHIPPED_V, shipped_central_v
from fedfer.bench.cli import main as bench_main
from fedfer.security.errors import ValidationError

CORPUS = Path("data/taiwanese-emotions")
DETECTOR = Path("models/mediapipe/face_detection_short_range.tflite")
PEOPLE = (1, 2, 3, 11)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("people-cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("FEDFER_CACHE_DIR", str(path))
    yield path
    mp.undo()


@pytest.fixture(scope="module")
def net() -> FaceNet:
    return load_ifer(shipped_ifer())


@pytest.fixture(scope="module")
def feats(assets: Path, net: FaceNet, cache: Path) -> list[tw.PhotoFeatures]:
    photos = [p for p in tw.scan(assets / CORPUS) if p.performer in PEOPLE]
    return tw.photo_features(photos, net, detector=assets / DETECTOR)


def _central(k: int) -> dict[str, np.ndarray]:
    arrays, _ = shipped_central_v(k)
    return arrays


def test_the_corpus_and_its_fixed_protocol(assets: Path) -> None:
    photos = tw.scan(assets / CORPUS)
    assert len(photos) == 1223  # 1,232 files, 9 neutral shots without a letter left out
    performers = {p.performer for p in photos}
    assert performers == set(tw.DEV_PERFORMERS) | set(tw.TEST_PERFORMERS) and len(performers) == 29
    assert not set(tw.DEV_PERFORMERS) & set(tw.TEST_PERFORMERS) and 4 not in performers
    for part in ("dev", "test"):
        assert not set(tw.FEDERATING[part]) & set(tw.UNSEEN[part])
    assert set(tw.FEDERATING["dev"]) | set(tw.UNSEEN["dev"]) == set(tw.DEV_PERFORMERS)
    assert set(tw.FEDERATING["test"]) | set(tw.UNSEEN["test"]) == set(tw.TEST_PERFORMERS)
    groups = tw.groups(
        photos, classes=("happiness", "anger", "sadness", "neutral", "fear", "disgust", "surprise")
    )
    assert sum(len(g.photos) for g in groups) == 1223
    for g in groups:  # one (performer, type, expression) per clip, in serial order
        assert {(p.performer, p.type, p.expression) for p in g.photos} == {
            (g.performer, g.type, g.expression)
        }
        assert [p.serial for p in g.photos] == sorted(p.serial for p in g.photos)
    assert tw.FORWARD.adapt == (0, 1, 2) and tw.FORWARD.test == (3,) and tw.REVERSE.adapt == (3,)
    with pytest.raises(DatasetError, match="no photo named like the corpus"):
        tw.scan(assets / "data" / "crema-d-sample")


def test_photos_go_through_the_device_crop_and_are_cached(
    assets: Path, net: FaceNet, feats: list[tw.PhotoFeatures], monkeypatch: pytest.MonkeyPatch
) -> None:
    wanted = [p for p in tw.scan(assets / CORPUS) if p.performer in PEOPLE]
    assert len(feats) == len(wanted)  # MediaPipe finds every frontal face
    assert all(f.features.shape == (1280,) and abs(float(f.probs.sum()) - 1.0) < 1e-4 for f in feats)
    # The IFER is right well above chance (1/7) on these real, never-seen faces.
    hits = [net.classes[int(f.probs.argmax())] == f.photo.expression for f in feats]
    assert np.mean(hits) > 0.4

    def no_detector(self: ClipFaces, path: Path) -> None:
        raise AssertionError("a cached photo must not be detected again")

    monkeypatch.setattr(ClipFaces, "image", no_detector)
    again = tw.photo_features(wanted, net, detector=assets / DETECTOR)
    assert all(np.array_equal(a.features, b.features) for a, b in zip(again, feats, strict=True))


def test_person_clips_keep_adaptation_and_test_apart(net: FaceNet, feats: list[tw.PhotoFeatures]) -> None:
    for split in (tw.FORWARD, tw.REVERSE):
        people = tw.person_clips(feats, net.classes, num_classes=6, split=split)
        assert [p.person for p in people] == ["01", "02", "03", "11"]
        for person in people:
            assert person.adapt and person.test
            assert all(c.probs.shape == (len(c.features), 6) for c in (*person.adapt, *person.test))
    fwd = tw.person_clips(feats, net.classes, num_classes=6, split=tw.FORWARD)
    n_images = sum(len(c.features) for p in fwd for c in (*p.adapt, *p.test))
    assert n_images == sum(1 for f in feats if f.photo.expression != "surprise")  # 6 classes: no surprise


def test_bias_only_personalization_changes_only_the_biases(
    net: FaceNet, feats: list[tw.PhotoFeatures]
) -> None:
    person = tw.person_clips(feats, net.classes, num_classes=6, split=tw.FORWARD)[1]
    central = _central(6)
    model, res = adapt(person, central, num_classes=6, method=METHODS["biases"])
    assert res.selected > 0
    delta = model_delta(central, to_named_arrays(model))
    biases = set(trainable_names(VideoModel(num_classes=6), "biases"))
    assert biases and all(name.rsplit(".", 1)[-1].startswith("bias") for name in biases)
    changed = {k for k, d in delta.items() if np.abs(d).max() > 0}
    assert changed and changed <= biases
    with pytest.raises(DatasetError, match="train must be one of"):
        PersonalizeConfig(train="weights")


def test_personalize_people_reports_tables_per_person_and_deltas(
    net: FaceNet, feats: list[tw.PhotoFeatures]
) -> None:
    people = tw.person_clips(feats, net.classes, num_classes=6, split=tw.FORWARD)
    got = personalize_people(people, _central(6), num_classes=6, method=METHODS["paper"])
    assert got["people"] == 4 and [r["person"] for r in got["per_person"]] == ["01", "02", "03", "11"]
    images = sum(len(c.features) for p in people for c in p.test)
    for when in ("before", "after"):
        table = got["table"]["image"][when]
        assert sum(v["support"] for v in table["per_class"].values()) == images
        assert sum(v["support"] for v in got["table"]["clip"][when]["per_class"].values()) == sum(
            len(p.test) for p in people
        )
    summary = got["summary"]["image"]
    assert summary["improved"] + summary["unchanged"] + summary["worse"] == 4
    rows = {r["person"]: r for r in got["per_person"]}
    for s in summary["subjects"]:
        assert s["delta"] == pytest.approx(
            rows[s["subject"]]["image_after"] - rows[s["subject"]]["image_before"]
        )
    with pytest.raises(DatasetError):
        personalize_people([PersonClips("x", (), ())], _central(6), num_classes=6, method=METHODS["paper"])


def test_secure_fedavg_recovers_the_plaintext_fedavg_mean(
    net: FaceNet, feats: list[tw.PhotoFeatures]
) -> None:
    people = tw.person_clips(feats, net.classes, num_classes=6, split=tw.FORWARD)
    federating, unseen = people[:3], people[3:]
    central = _central(6)
    method = METHODS["biases"]
    got = secure_fedavg(federating, unseen, central, num_classes=6, method=method, rounds=1)
    # Plaintext FedAvg of the same personalized v's, weighted by selected clips.
    total: dict[str, np.ndarray] = {k: np.zeros_like(v, dtype=np.float64) for k, v in central.items()}
    weight = 0
    for person in federating:
        model, res = adapt(person, central, num_classes=6, method=method)
        for k, d in model_delta(central, to_named_arrays(model)).items():
            total[k] += res.selected * d
        weight += res.selected
    assert got["rounds"][1]["total_weight"] == weight and got["rounds"][1]["contributors"] == 3
    for k, v in central.items():
        np.testing.assert_allclose(got["final"][k], v + total[k] / weight, atol=1e-5)
    assert got["rounds"][0]["image"]["micro_f1"] >= 0.0 and got["epsilon"] is None
    with pytest.raises(DatasetError, match="two federating people"):
        secure_fedavg(federating[:1], unseen, central, num_classes=6, method=method)


def test_the_shipped_central_v_is_trained_and_refused_when_changed(tmp_path: Path) -> None:
    for k, pinned in SHIPPED_V.items():
        arrays, meta = shipped_central_v(k)
        assert len(meta["classes"]) == k and meta["storage"] == "float16" and meta["dev_macro_f1"] > 0.6
        assert sum(a.size for a in arrays.values()) == meta["parameters"]
        assert all(a.dtype == np.float32 for a in arrays.values())
        assert pinned.folder == f"vfer-{k}"
    root = tmp_path / "release"
    shutil.copytree(Path(__file__).resolve().parents[2] / "aggregator" / "release", root)
    blob = bytearray((root / "vfer-6" / "vfer.npz").read_bytes())
    blob[-10] ^= 0xFF
    (root / "vfer-6" / "vfer.npz").write_bytes(bytes(blob))
    with pytest.raises(ValidationError, match=r"vfer-6/vfer\.npz does not match its pinned SHA-256"):
        shipped_central_v(6, root=root)
    with pytest.raises(ValidationError, match="no shipped central v for 5"):
        shipped_central_v(5)


def test_personalize_corpus_cli_on_the_taiwanese_corpus(
    assets: Path, feats: list[tw.PhotoFeatures], capsys: pytest.CaptureFixture[str]
) -> None:
    vfer = Path(__file__).resolve().parents[2] / "aggregator" / "release" / "vfer-6" / "vfer.json"
    args = [
        "personalize-corpus",
        "--corpus",
        "taiwanese",
        "--root",
        str(assets / CORPUS),
        "--vfer",
        str(vfer),
    ]
    args += ["--performers", "1,2,3,11", "--rounds", "1", "--json"]
    assert agent_main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["method"] == "biases" and out["people"] == 4 and len(out["fedavg"]) == 2
    assert agent_main([*args[:-1]]) == 0  # the text tables
    text = capsys.readouterr().out
    assert "before personalization (image level, pooled tests)" in text and "mean delta" in text


def test_the_personalization_benchmark_prints_one_json(
    assets: Path,
    cache: Path,
    feats: list[tw.PhotoFeatures],
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    args = [
        "personalization",
        "--assets",
        str(assets),
        "--performers",
        "dev",
        "--limit",
        "3",
        "--classes",
        "6",
    ]
    args += ["--fer-test-limit", "200", "--rounds", "1", "--splits", "forward", "--dp-epsilon", "8"]
    args += ["--plot-dir", str(tmp_path)]
    assert bench_main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert (
        out["ok"]
        and out["performer_ids"] == [1, 2, 7]
        and out["photos"]["faces"] == out["photos"]["labelled"]
    )
    cross = out["cross_corpus"]["7"]
    assert cross["ifer_minus_peer_macro_f1"] == pytest.approx(
        cross["ifer"]["macro_f1"] - cross["peer"]["macro_f1"]
    )
    six = out["classes"]["6"]
    assert six["central_v"]["source"] == "shipped"
    for m in ("paper", "biases"):
        runs = six["personalization"]["forward"][m]
        assert set(runs) == {"plain", "dp_sgd"}
        assert 0 < runs["dp_sgd"]["epsilon_max"] <= 8.0 + 1e-6
        assert Path(runs["plain"]["plots"]["image"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        fed = six["fedavg"][m]
        assert fed["user_dp"]["epsilon"] == pytest.approx(8.0, rel=1e-3)
        assert [r["round"] for r in fed["plain"]["rounds"]] == [0, 1]
