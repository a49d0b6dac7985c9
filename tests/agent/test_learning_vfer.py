"""Central ``train-vfer`` on a small CREMA-D layout (the real clips under several real actor ids, the
official tables filtered to them): hard labels and partial labels (KL loss), export with manifest, falling
loss, subject-disjoint splits; and ``personalize-corpus`` scoring the test-split actors by default."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedfer.agent.cli import main
from fedfer.agent.models.export import load_exported
from fedfer.agent.models.ifer import FaceNet, load_backbone, save_ifer
from fedfer.agent.records import CLASS_SETS
from fedfer.agent.training.crema import corpus_split
from fedfer.agent.training.data import crema_vote_labels, read_crema_summary
from fedfer.agent.training.vfer import load_vfer
from tests.agent.crema_layout import build_crema_layout


@pytest.fixture(scope="module")
def corpus(assets: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """``(root, ifer manifest, cache dir)``: the layout and an IFER export (f real, g untrained: only the
    features matter for training v)."""
    base = tmp_path_factory.mktemp("crema")
    root = base / "corpus"
    build_crema_layout(root, assets / "data" / "crema-d-sample")
    backbone, norm = load_backbone(
        assets / "models" / "mobilenet_v2_tflite" / "mobilenet_v2_1.0_224_quant.tflite"
    )
    ifer = save_ifer(FaceNet(backbone=backbone, normalization=norm, num_classes=6, split=19), base / "ifer")
    return root, ifer, base / "cache"


@pytest.fixture
def env(corpus: tuple[Path, Path, Path], assets: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDFER_CACHE", str(corpus[2]))  # clip features are computed once for the module
    monkeypatch.setenv("FEDFER_ASSETS", str(assets))


def _train(corpus: tuple[Path, Path, Path], out: Path, *extra: str) -> dict[str, object]:
    root, ifer, _ = corpus
    args = ["train-vfer", "--root", str(root), "--ifer", str(ifer), "--out", str(out), "--fps", "5"]
    assert main([*args, "--epochs", "3", *extra]) == 0
    _, meta = load_exported(out / "vfer.json")
    return meta


@pytest.mark.usefixtures("env")
def test_train_vfer_hard_labels_exports_v_on_subject_disjoint_splits(
    corpus: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    meta = _train(corpus, tmp_path / "v")
    out = capsys.readouterr()
    assert "VFER on the CREMA-D test split" in out.out and "macro" in out.out
    expected = corpus_split(corpus[0])
    labelled = crema_vote_labels(read_crema_summary(corpus[0] / "summaryTable.csv").values())
    for part in ("train", "dev", "test"):
        actors = getattr(expected, part)
        n = sum(1 for name in labelled if int(name.split("_")[0]) in actors)
        assert f"{part}: {n} clips of {len(actors)} actors" in out.err  # face-vote ties are left out
    v = load_vfer(tmp_path / "v" / "vfer.json")
    assert v.num_classes == 6 and meta["kind"] == "vfer" and meta["classes"] == list(CLASS_SETS[6])
    assert meta["targets"] == "hard" and meta["parameters"] == sum(p.numel() for p in v.parameters())
    losses = [h["loss"] for h in meta["history"]]  # type: ignore[index, union-attr]
    assert len(losses) == 3 and losses[-1] < losses[0]
    split = meta["split_actors"]
    assert isinstance(split, dict)
    train, dev, test = (set(split[k]) for k in ("train", "dev", "test"))
    assert train and dev and test and not (train & dev or train & test or dev & test)
    assert (sorted(train), sorted(dev), sorted(test)) == (
        list(expected.train),
        list(expected.dev),
        list(expected.test),
    )
    # The test report covers exactly the labelled clips of the test actors.
    n_test = sum(1 for name in labelled if int(name.split("_")[0]) in test)
    assert sum(c["support"] for c in meta["test"]["per_class"].values()) == n_test  # type: ignore[index]


@pytest.mark.usefixtures("env")
def test_train_vfer_partial_labels_uses_the_kl_loss(corpus: tuple[Path, Path, Path], tmp_path: Path) -> None:
    responses = corpus[0] / "finishedResponses.csv"
    meta = _train(corpus, tmp_path / "v", "--partial-labels", str(responses))
    assert meta["targets"] == "partial"
    losses = [h["loss"] for h in meta["history"]]  # type: ignore[index, union-attr]
    assert losses[-1] < losses[0]
    hard = _train(corpus, tmp_path / "h")
    # Another target gives another loss curve (KL against vote distributions, not CE against one label).
    assert [h["loss"] for h in hard["history"]] != losses  # type: ignore[union-attr, index]
    load_vfer(tmp_path / "v" / "vfer.json")


@pytest.mark.usefixtures("env")
def test_personalize_corpus_scores_the_test_split_actors_by_default(
    corpus: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, ifer, _ = corpus
    _train(corpus, tmp_path / "v")
    capsys.readouterr()
    args = ["personalize-corpus", "--root", str(root), "--ifer", str(ifer), "--vfer", str(tmp_path / "v")]
    args += ["--fps", "5", "--p-threshold", "0.0"]
    assert main([*args, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    test = list(corpus_split(root).test)
    assert result["actors"] == test and result["actors_from"] == f"the test split ({len(test)} actors)"
    assert [r["subject"] for r in result["runs"]] == test
    assert sorted(s["subject"] for s in result["subjects"]["subjects"]) == [str(a) for a in test]
    # --subject overrides the default (any actor, e.g. one of the training actors, on request).
    assert main([*args, "--json", "--subject", str(corpus_split(root).train[0])]) == 0
    assert json.loads(capsys.readouterr().out)["actors"] == [corpus_split(root).train[0]]
    # Without --json: the paper's tables before and after, then the per-subject deltas.
    assert main(args) == 0
    text = capsys.readouterr().out
    assert f"scored actors (the test split ({len(test)} actors)): " + ", ".join(map(str, test)) in text
    for when in ("before", "after"):
        assert f"{when} personalization: pooled test halves of {len(test)} subject(s)" in text
    assert text.count("happiness") == 2 and text.count("\nmacro") == 2 and text.count("\nmicro") == 2
    assert "mean delta" in text and all(f"\n{a}" in text for a in test)


@pytest.mark.usefixtures("env")
def test_personalize_corpus_dp_options_are_validated(
    corpus: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, ifer, _ = corpus
    base = ["personalize-corpus", "--root", str(root), "--ifer", str(ifer), "--vfer", str(tmp_path / "x")]
    with pytest.raises(SystemExit):  # argparse: the two ways of choosing the noise exclude each other
        main([*base, "--dp-epsilon", "8", "--dp-noise-multiplier", "1.0"])
    assert "not allowed with argument" in capsys.readouterr().err
    assert main([*base, "--dp-noise-multiplier", "-1"]) == 2
    assert "noise_multiplier must be a positive" in capsys.readouterr().err
    assert main([*base, "--dp-epsilon", "8", "--dp-max-grad-norm", "0"]) == 2
    assert "max_grad_norm must be positive" in capsys.readouterr().err
