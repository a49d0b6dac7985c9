"""Pseudo labels and clip selection exactly as in the paper; fine-tuning v with and without DP; budget."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedfer.agent.errors import DatasetError, PrivacyBudgetExceededError
from fedfer.agent.learning.dp import DPConfig
from fedfer.agent.learning.ledger import PrivacyBudget
from fedfer.agent.learning.personalize import (
    PersonalizeConfig,
    finetune_v,
    pad_clips,
    personalize,
    predict_clips,
    pseudo_labels,
    select_clips,
)
from fedfer.agent.models.video import VideoModel, to_named_arrays


def test_pseudo_label_is_argmax_of_the_mean_of_frame_probabilities() -> None:
    # Frame-wise argmax would say class 0 twice; the mean says class 1.
    clip = np.array([[0.5, 0.4, 0.1], [0.5, 0.4, 0.1], [0.0, 1.0, 0.0]])
    labels, conf = pseudo_labels([clip, np.array([[0.2, 0.2, 0.6]])])
    assert labels.tolist() == [1, 2]
    assert conf == pytest.approx([0.6, 0.6])
    with pytest.raises(DatasetError):
        pseudo_labels([np.zeros((0, 3))])


def test_selection_keeps_top_p_per_class_above_threshold() -> None:
    labels = np.array([0, 0, 0, 0, 1, 1, 2, 2, 2])
    conf = np.array([0.9, 0.55, 0.95, 0.49, 0.7, 0.3, 0.8, 0.8, 0.51])
    keep = select_clips(labels, conf, num_classes=3, per_class=2, p_threshold=0.5)
    # class 0: 0.95 (#2), 0.9 (#0); #1 loses to them, #3 is below 0.5.
    # class 1: only #4 passes.  class 2: tie at 0.8 keeps both (#6, #7) over 0.51.
    assert keep.tolist() == [0, 2, 4, 6, 7]
    assert select_clips(labels, conf, num_classes=3, per_class=50, p_threshold=0.99).size == 0
    assert select_clips(labels, conf, num_classes=3, per_class=1, p_threshold=0.0).tolist() == [2, 4, 6]


def test_pad_clips_zero_pre_pads() -> None:
    a = np.ones((2, 1280), np.float32)
    b = np.full((4, 1280), 2.0, np.float32)
    out = pad_clips([a, b])
    assert out.shape == (2, 4, 1280)
    assert np.all(out[0, :2] == 0) and np.all(out[0, 2:] == 1)
    assert pad_clips([b], length=3).shape == (1, 3, 1280)
    with pytest.raises(DatasetError):
        pad_clips([np.ones((2, 10))])


def _toy_clips(n: int, k: int, seed: int) -> tuple[list[np.ndarray], np.ndarray]:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(k, 1280, generator=g)
    labels = torch.arange(n) % k
    clips = [(centers[c] + 0.5 * torch.randn(6, 1280, generator=g)).numpy() for c in labels.tolist()]
    return clips, labels.numpy()


def test_personalize_learns_from_confident_pseudo_labels() -> None:
    k = 4
    clips, truth = _toy_clips(80, k, 0)
    probs = [np.tile(np.eye(k, dtype=np.float32)[t] * 0.7 + 0.075, (6, 1)) for t in truth]
    v0 = VideoModel(num_classes=k)
    before = (predict_clips(v0, pad_clips(clips)).argmax(1) == truth).mean()
    model, res = personalize(
        to_named_arrays(v0), clips, probs, num_classes=k, config=PersonalizeConfig(epochs=6, per_class=15)
    )
    assert res.selected == 60 and res.per_class == [15] * k
    assert res.epsilon is None
    after = (predict_clips(model, pad_clips(clips)).argmax(1) == truth).mean()
    assert after > 0.9 > before


def test_personalize_with_no_confident_clip_returns_v_unchanged() -> None:
    clips, _ = _toy_clips(8, 4, 1)
    probs = [np.full((6, 4), 0.25, np.float32) for _ in clips]
    v0 = VideoModel(num_classes=4)
    model, res = personalize(to_named_arrays(v0), clips, probs, num_classes=4)
    assert res.selected == 0
    for k, v in to_named_arrays(model).items():
        np.testing.assert_array_equal(v, to_named_arrays(v0)[k])


def test_dp_personalization_reports_and_persists_epsilon_and_refuses_when_spent(tmp_path: Path) -> None:
    clips, labels = _toy_clips(40, 4, 2)
    x = pad_clips(clips)
    arrays = to_named_arrays(VideoModel(num_classes=4))
    budget = PrivacyBudget(path=tmp_path / "dev" / "budget.json", epsilon_limit=3.5)
    cfg = PersonalizeConfig(epochs=1, batch_size=8)
    model, res = finetune_v(
        arrays, x, labels, num_classes=4, config=cfg, dp=DPConfig(target_epsilon=3.0), budget=budget
    )
    assert res.epsilon is not None and 2.0 < res.epsilon <= 3.05
    assert res.noise_multiplier is not None and res.noise_multiplier > 0
    assert isinstance(model, VideoModel) and not any(".l0." in k for k in model.state_dict())
    changed = any(not np.array_equal(v, arrays[k]) for k, v in to_named_arrays(model).items())
    assert changed
    # Persisted per device: a fresh handle on the same file sees the spend.
    again = PrivacyBudget(path=tmp_path / "dev" / "budget.json", epsilon_limit=3.5)
    assert again.spent() == pytest.approx(res.epsilon_total)
    # Another eps-3 run would exceed the limit of 3.5 (even under RDP composition): refused before
    # training, nothing recorded.
    with pytest.raises(PrivacyBudgetExceededError):
        finetune_v(
            arrays, x, labels, num_classes=4, config=cfg, dp=DPConfig(target_epsilon=3.0), budget=again
        )
    assert PrivacyBudget(path=tmp_path / "dev" / "budget.json", epsilon_limit=3.5).spent() == pytest.approx(
        res.epsilon_total
    )
    # A spent budget refuses outright.
    tight = PrivacyBudget(path=tmp_path / "dev" / "budget.json", epsilon_limit=1.0)
    with pytest.raises(PrivacyBudgetExceededError):
        tight.check()


def test_dp_by_noise_multiplier() -> None:
    clips, labels = _toy_clips(32, 4, 3)
    _, res = finetune_v(
        to_named_arrays(VideoModel(num_classes=4)),
        pad_clips(clips),
        labels,
        num_classes=4,
        config=PersonalizeConfig(epochs=1, batch_size=8),
        dp=DPConfig(target_epsilon=None, noise_multiplier=4.0),
    )
    assert res.noise_multiplier == pytest.approx(4.0)
    assert res.epsilon is not None and 0 < res.epsilon < 3


def test_config_validation() -> None:
    with pytest.raises(DatasetError):
        PersonalizeConfig(per_class=0)
    with pytest.raises(DatasetError):
        PersonalizeConfig(p_threshold=1.5)
    from fedfer.security.errors import ValidationError

    with pytest.raises(ValidationError):
        DPConfig(target_epsilon=8.0, noise_multiplier=1.0)
    with pytest.raises(ValidationError):
        DPConfig(target_epsilon=-1.0)


def test_target_epsilon_calibration_is_opacus_own_and_memoized() -> None:
    import warnings

    import torch
    from opacus import PrivacyEngine
    from opacus.accountants import RDPAccountant
    from torch.utils.data import DataLoader, TensorDataset

    from fedfer.agent.learning.dp import noise_for_target, rdp_epsilon

    loader = DataLoader(TensorDataset(torch.zeros(40, 3), torch.zeros(40, dtype=torch.long)), batch_size=8)
    model = torch.nn.Linear(3, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, optimizer, _ = PrivacyEngine(accountant="rdp").make_private_with_epsilon(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=loader,
            target_epsilon=3.0,
            target_delta=1e-5,
            epochs=2,
            max_grad_norm=1.0,
        )
    sigma = noise_for_target(3.0, 1e-5, 1.0 / len(loader), 2)
    assert sigma == pytest.approx(optimizer.noise_multiplier)  # the same choice as make_private_with_epsilon
    ref = RDPAccountant()
    ref.history = [(sigma, 1.0 / len(loader), 2 * len(loader))]
    assert 3.0 - 0.011 <= ref.get_epsilon(delta=1e-5) <= 3.0
    assert rdp_epsilon(ref.history, 1e-5) == pytest.approx(ref.get_epsilon(delta=1e-5))
    hits = noise_for_target.cache_info().hits
    assert noise_for_target(3.0, 1e-5, 1.0 / len(loader), 2) == sigma
    assert noise_for_target.cache_info().hits == hits + 1  # memoized: no second search
