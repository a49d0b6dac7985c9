"""Metrics in the paper's table format, per-subject deltas and the PNG plot; exports with manifests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedfer.agent.errors import ModelFileError
from fedfer.agent.models.export import load_exported, save_exported
from fedfer.agent.models.video import VideoModel, to_named_arrays
from fedfer.agent.training.metrics import (
    ClassReport,
    classification_report,
    format_report,
    format_subject_deltas,
    plot_subject_deltas,
    subject_deltas,
)
from fedfer.agent.training.vfer import load_vfer, save_vfer, soft_targets
from fedfer.security.errors import ValidationError


def test_report_matches_hand_computed_scores() -> None:
    y = [0, 0, 0, 1, 1, 2]
    p = [0, 0, 1, 1, 2, 2]
    rep = classification_report(y, p, ("a", "b", "c"))
    assert rep.precision == pytest.approx((1.0, 0.5, 0.5))
    assert rep.recall == pytest.approx((2 / 3, 0.5, 1.0))
    f1 = (0.8, 0.5, 2 / 3)
    assert rep.f1 == pytest.approx(f1)
    assert rep.macro_f1 == pytest.approx(sum(f1) / 3)
    assert rep.micro_f1 == pytest.approx(4 / 6)
    assert rep.confusion == ((2, 1, 0), (0, 1, 1), (0, 0, 1))
    text = format_report(rep, title="toy")
    assert "macro" in text and "micro" in text and "66.7" in text
    assert rep.as_dict()["per_class"]["a"]["f1"] == pytest.approx(0.8)
    # A report read back from JSON is the same report (the CLI prints tables from its JSON result).
    assert ClassReport.from_dict(json.loads(json.dumps(rep.as_dict()))) == rep
    with pytest.raises(ValidationError, match="not a classification report"):
        ClassReport.from_dict({"classes": ["a"]})
    with pytest.raises(ValidationError):
        classification_report([0, 3], [0, 1], ("a", "b"))
    with pytest.raises(ValidationError):
        classification_report([], [], ("a",))


def test_subject_deltas_and_plot(tmp_path: Path) -> None:
    summary = subject_deltas({"s1": 0.5, "s2": 0.6, "s3": 0.7}, {"s1": 0.6, "s2": 0.6, "s3": 0.65})
    assert summary["improved"] == 1 and summary["unchanged"] == 1 and summary["worse"] == 1
    assert summary["mean_delta"] == pytest.approx((0.1 + 0.0 - 0.05) / 3)
    assert "+10.0" in format_subject_deltas(summary)
    png = plot_subject_deltas(summary, tmp_path / "d.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValidationError):
        subject_deltas({"a": 1.0}, {"b": 1.0})


def test_export_round_trip_and_tamper_detection(tmp_path: Path) -> None:
    v = VideoModel(num_classes=6)
    manifest = save_vfer(v, tmp_path / "m", extra={"note": "t"})
    meta = json.loads(manifest.read_text())
    assert meta["kind"] == "vfer" and meta["parameters"] == sum(p.numel() for p in v.parameters())
    back = load_vfer(manifest)
    for k, a in to_named_arrays(back).items():
        np.testing.assert_array_equal(a, to_named_arrays(v)[k])
    arrays, _ = load_exported(tmp_path / "m")  # a folder with one manifest works too
    assert set(arrays) == set(to_named_arrays(v))
    weights = tmp_path / "m" / meta["weights"]
    blob = bytearray(weights.read_bytes())
    blob[-10] ^= 1
    weights.write_bytes(bytes(blob))
    with pytest.raises(ModelFileError):
        load_vfer(manifest)
    with pytest.raises(ModelFileError):
        save_exported(tmp_path, "../x", {}, {})


def test_soft_targets_mask_zero_votes() -> None:
    t = soft_targets(np.array([[3, 0, 1], [0, 2, 0]]))
    assert t[0, 1] == 0.0 and t[1].tolist() == [0.0, 1.0, 0.0]
    assert t[0, 0] == pytest.approx(np.exp(3) / (np.exp(3) + np.exp(1)))
    from fedfer.agent.errors import DatasetError

    with pytest.raises(DatasetError):
        soft_targets(np.array([[0, 0]]))
