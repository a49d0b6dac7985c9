"""``fedfer-bench learning`` end to end at a tiny size: one JSON object with the issue's keys, typed and in
range; the peer scored on real FER2013 test images; the device cost against the paper's f at 224; the
personalization diagnostics and the tuning on separate subjects; the real CREMA-D sample through the clip
path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SUBJECTS, TUNE_SUBJECTS, TIMING_CLIPS, FRAMES = 2, 2, 16, 3


def test_bench_learning_smoke_prints_the_required_keys(assets: Path, tmp_path: Path) -> None:
    env = {**os.environ, "FEDFER_CACHE": str(tmp_path / "cache"), "FEDFER_ASSETS": str(assets)}
    args = ["--train-limit", "40", "--test-limit", "150", "--epochs", "1", "--subjects", str(SUBJECTS)]
    args += ["--tune-subjects", str(TUNE_SUBJECTS), "--edge-seconds", "1"]
    args += ["--adapt-clips", "16", "--test-clips", "8", "--frames", str(FRAMES)]
    args += ["--timing-clips", str(TIMING_CLIPS), "--v-clips-per-class", "4", "--v-epochs", "1"]
    args += ["--plot", str(tmp_path / "subjects.png"), "--ifer6"]
    proc = subprocess.run(
        [sys.executable, "-m", "fedfer.bench.cli", "learning", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = proc.stdout.strip().splitlines()  # exactly one JSON object
    out = json.loads(line)
    for key in ("ifer_macro_f1", "ifer_micro_f1", "peer_macro_f1", "peer_micro_f1", "ifer6_macro_f1"):
        assert type(out[key]) is float and 0.0 <= out[key] <= 1.0, key
    # The published mini-Xception (~66% on FER2013) is far above chance on the same real test images.
    assert out["peer_micro_f1"] > 0.4 and out["test_images_6"] < out["test_images_7"] == 150
    assert out["ifer6_train_images"] < out["ifer_train_images"]  # the 6-class IFER never sees surprise
    # Trained in this run (fresh cache), with the dev split of train for model selection.
    assert out["ifer_train_cached"] is False and out["ifer_dev_images"] == 7
    assert out["ifer_train_images"] == 33 and len(out["ifer_history"]) == 1
    assert out["ifer_input_size"] == 64 and out["ifer_finetuned_from_block"] == 1
    # Device cost: our IFER per 224x224 crop against the paper's f at 224, and the whole edge pipeline.
    for key in ("ifer_device_fps_cpu", "f224_fps_cpu", "edge_frames_per_s", "edge_f224_frames_per_s"):
        assert type(out[key]) is float and out[key] > 0.0, key
    assert out["ifer_device_cost_vs_f224"] == pytest.approx(out["f224_fps_cpu"] / out["ifer_device_fps_cpu"])
    delta = out["personalization_mean_delta"]
    assert type(delta) is float and -1.0 <= delta <= 1.0
    counts = [out[k] for k in ("subjects_improved", "subjects_unchanged", "subjects_worse")]
    assert all(type(c) is int and c >= 0 for c in counts) and sum(counts) == SUBJECTS
    for key in ("personalize_s", "personalize_dp_s", "personalize_cpu_s", "personalize_dp_cpu_s"):
        assert type(out[key]) is float and out[key] > 0.0, key
    assert out["personalize_max_s"] >= out["personalize_s"]
    assert out["personalize_dp_max_s"] >= out["personalize_dp_s"]
    assert out["personalize_clips"] == TIMING_CLIPS and out["personalize_frames"] == FRAMES
    assert type(out["dp_epsilon"]) is float and 0.0 < out["dp_epsilon"] <= 8.0 + 0.01
    assert "SIMULATED" in out["simulation"]
    # Diagnostics: pseudo-label accuracy per subject and the oracle (true labels on the selected clips).
    for name, diag in out["subject_pseudo_labels"].items():
        assert 0.0 <= diag["pseudo_accuracy"] <= 1.0 and 0 <= diag["selected"] <= 16, name
    assert set(out["subject_micro_f1_after_oracle"]) == set(out["subject_micro_f1_before"])
    # Tuning on separate subjects: every setting scored; the best non-oracle one applied to the main ones.
    assert out["tuning_subjects"] == TUNE_SUBJECTS and "paper lr1e-3 ep2" in out["tuning"]
    assert out["personalization_tuned_config"] in out["tuning"]
    assert not out["personalization_tuned_config"].startswith("oracle")
    assert (tmp_path / "subjects.png").read_bytes()[:4] == b"\x89PNG"
    sample = out["crema_sample"]
    assert [c["clip"] for c in sample["clips"]] == [
        f"1001_DFA_{e}_XX" for e in ("ANG", "DIS", "FEA", "HAP", "NEU", "SAD")
    ]
    assert [c["crowd_face"] for c in sample["clips"]] == [
        "anger", "anger", "disgust", "happiness", "neutral", "neutral"
    ]  # fmt: skip
    assert all(c["frames"] > 0 and 0.0 < c["confidence"] <= 1.0 for c in sample["clips"])
    assert 0.0 <= sample["pseudo_agreement_with_crowd_face"] <= 1.0
    assert sample["adapt_clips"] == 3 and sample["test_clips"] == 3
