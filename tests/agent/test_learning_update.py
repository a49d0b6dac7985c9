"""v updates with user-level DP: clipped over all arrays, noise shares sum to the intended noise."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedfer.agent.errors import PrivacyBudgetExceededError
from fedfer.agent.learning.ledger import RoundBudget
from fedfer.agent.learning.update import (
    RoundDPConfig,
    apply_update,
    model_delta,
    noise_for_epsilon,
    private_delta,
    round_contribution,
)
from fedfer.agent.models.video import VideoModel, to_named_arrays
from fedfer.security.dp import GaussianAccountant, gaussian_epsilon
from fedfer.security.errors import ValidationError


def test_delta_clip_noise_and_apply() -> None:
    central = to_named_arrays(VideoModel(num_classes=6))
    personal = {k: v + 0.01 for k, v in central.items()}
    delta = model_delta(central, personal)
    norm = np.sqrt(sum(float((d**2).sum()) for d in delta.values()))
    assert norm > 1.0
    clipped = private_delta(delta, max_norm=1.0, noise_multiplier=1e-12, num_clients=1)
    assert np.sqrt(sum(float((d**2).sum()) for d in clipped.values())) == pytest.approx(1.0, rel=1e-6)
    # direction kept: every coordinate shrinks by the same factor
    k = "out.bias"
    np.testing.assert_allclose(clipped[k], delta[k] / norm, rtol=1e-5)
    back = apply_update(central, delta)
    np.testing.assert_allclose(back[k], personal[k], rtol=1e-6)
    # 10 clients with shares of sigma=2: the SUM of their noise has std sigma*C.
    shares = [
        private_delta({k: np.zeros(20_000)}, max_norm=0.5, noise_multiplier=2.0, num_clients=10)
        for _ in range(10)
    ]
    total = sum(s[k] for s in shares)
    assert total.std() == pytest.approx(1.0, rel=0.05)
    acc = GaussianAccountant(delta=1e-5)
    per_round = acc.step(2.0)
    acc.step(2.0)
    assert acc.epsilon() > per_round > 0
    with pytest.raises(ValidationError):
        model_delta(central, {n: v for n, v in central.items() if n != k})


# ---- user-level DP for rounds: noise calibration, the per-device round budget, the contribution -------


def test_noise_for_epsilon_is_the_smallest_sigma_within_the_target() -> None:
    for eps in (0.5, 1.0, 4.0):
        sigma = noise_for_epsilon(eps, 1e-5)
        assert gaussian_epsilon(sigma, 1, 1e-5) <= eps
        assert gaussian_epsilon(sigma * 0.999, 1, 1e-5) > eps
    assert noise_for_epsilon(0.5, 1e-5) > noise_for_epsilon(4.0, 1e-5)
    with pytest.raises(ValidationError):
        noise_for_epsilon(0.0, 1e-5)
    cfg = RoundDPConfig.for_epsilon(epsilon=2.0, clip_norm=0.5, num_clients=4, delta=1e-5)
    assert cfg.round_epsilon() == pytest.approx(2.0, rel=1e-4)
    with pytest.raises(ValidationError, match="num_clients"):
        RoundDPConfig(clip_norm=1.0, noise_multiplier=1.0, num_clients=0)
    with pytest.raises(ValidationError, match="clip_norm"):
        RoundDPConfig(clip_norm=-1.0, noise_multiplier=1.0, num_clients=1)


def test_round_budget_composes_persists_and_refuses(tmp_path: Path) -> None:
    path = tmp_path / "rounds.json"
    budget = RoundBudget(path=path, epsilon_limit=5.0, delta=1e-5)
    assert budget.spent() == 0.0 and not path.exists()
    one, total = budget.record(2.0)
    assert one == pytest.approx(gaussian_epsilon(2.0, 1, 1e-5)) and total == pytest.approx(one)
    _, total2 = budget.record(3.0)
    acc = GaussianAccountant(delta=1e-5)
    acc.step(2.0)
    acc.step(3.0)
    assert total2 == pytest.approx(acc.epsilon()) and total < total2 < total + gaussian_epsilon(3.0, 1, 1e-5)
    # A fresh reader of the same file sees the same history (the budget survives restarts).
    again = RoundBudget(path=path, epsilon_limit=5.0, delta=1e-5)
    assert again.spent() == pytest.approx(total2) and len(again.rounds) == 2
    assert json.loads(path.read_text())["epsilon_total"] == pytest.approx(total2)
    # One more round at sigma 1 would pass the limit: refused, and nothing is recorded.
    with pytest.raises(PrivacyBudgetExceededError, match="would exceed"):
        again.check(1.0)
    assert again.check(20.0) > total2
    assert len(RoundBudget(path=path, epsilon_limit=5.0, delta=1e-5).rounds) == 2
    # Once spent, every round is refused whatever its noise.
    small = RoundBudget(path=path, epsilon_limit=total2, delta=1e-5)
    with pytest.raises(PrivacyBudgetExceededError, match="spent"):
        small.check(1000.0)
    # The file is bound to its delta, and a damaged file is an error (never a silent reset).
    with pytest.raises(ValidationError, match="different delta"):
        RoundBudget(path=path, epsilon_limit=5.0, delta=1e-6)
    before = path.read_bytes()
    path.write_text("{not json")
    with pytest.raises(ValidationError, match="unreadable"):
        RoundBudget(path=path, epsilon_limit=5.0, delta=1e-5)
    assert path.read_text() == "{not json" != before.decode()


def test_round_contribution_without_dp_is_the_raw_delta_weighted_by_examples() -> None:
    central = to_named_arrays(VideoModel(num_classes=6))
    personal = {k: v + 0.001 * (i + 1) for i, (k, v) in enumerate(central.items())}
    order = list(central)
    flat, weight, report = round_contribution(central, personal, order=order, examples=17)
    assert weight == 17 and report == {"round_dp": False}
    expected = np.concatenate([(personal[k].astype(np.float64) - central[k]).ravel() for k in order])
    np.testing.assert_allclose(flat, expected, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValidationError, match="example"):
        round_contribution(central, personal, order=order, examples=0)
    with pytest.raises(ValidationError, match="order"):
        round_contribution(central, personal, order=order[:-1], examples=3)


def test_round_contribution_with_dp_clips_noises_weights_one_and_charges_the_budget(tmp_path: Path) -> None:
    central = to_named_arrays(VideoModel(num_classes=6))
    personal = {k: v + 0.01 for k, v in central.items()}
    order = list(central)
    raw = np.concatenate([(personal[k].astype(np.float64) - central[k]).ravel() for k in order])
    assert np.linalg.norm(raw) > 1.0
    # Almost no noise: the upload is the clipped delta, same direction, norm C; weight 1 however many clips.
    quiet = RoundDPConfig(clip_norm=0.5, noise_multiplier=1e-9, num_clients=1)
    flat, weight, report = round_contribution(central, personal, order=order, examples=40, dp=quiet)
    assert weight == 1 and report["round_dp"] is True and report["round_clipped"] is True
    assert np.linalg.norm(flat) == pytest.approx(0.5, rel=1e-6)
    np.testing.assert_allclose(flat, raw * 0.5 / np.linalg.norm(raw), rtol=1e-5, atol=1e-12)
    assert report["round_update_norm"] == pytest.approx(np.linalg.norm(raw), rel=1e-5)
    # Real noise: 4 expected clients, each adds N(0, (sigma C)^2 / 4) per coordinate.
    dp = RoundDPConfig(clip_norm=0.5, noise_multiplier=1.5, num_clients=4)
    budget = RoundBudget(path=tmp_path / "r.json", epsilon_limit=1.2 * dp.round_epsilon())
    noisy, weight, report = round_contribution(
        central, personal, order=order, examples=40, dp=dp, budget=budget
    )
    clipped = raw * 0.5 / np.linalg.norm(raw)
    assert weight == 1
    assert (noisy - clipped).std() == pytest.approx(1.5 * 0.5 / 2, rel=0.02)
    assert report["round_noise_share_std"] == pytest.approx(0.375)
    assert report["round_epsilon"] == pytest.approx(dp.round_epsilon())
    assert report["round_epsilon_total"] == pytest.approx(dp.round_epsilon())
    assert len(RoundBudget(path=tmp_path / "r.json", epsilon_limit=100.0).rounds) == 1
    # The second round does not fit the budget: refused before anything is produced or recorded.
    with pytest.raises(PrivacyBudgetExceededError):
        round_contribution(central, personal, order=order, examples=40, dp=dp, budget=budget)
    assert len(RoundBudget(path=tmp_path / "r.json", epsilon_limit=100.0).rounds) == 1
