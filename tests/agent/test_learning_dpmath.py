"""fedfer.security.dp: clipping, CSPRNG Gaussian noise, distributed noise shares and the RDP accountant."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedfer.security.dp import (
    GaussianAccountant,
    clip_by_l2,
    gaussian_epsilon,
    gaussian_noise,
    noise_share_std,
    privatize_update,
)
from fedfer.security.errors import ValidationError


def test_clip_by_l2_scales_only_large_updates() -> None:
    big = np.full(100, 1.0)
    clipped, norm = clip_by_l2(big, 2.0)
    assert norm == pytest.approx(10.0)
    assert np.linalg.norm(clipped) == pytest.approx(2.0)
    small = np.array([0.3, 0.4])
    same, norm = clip_by_l2(small, 2.0)
    assert norm == pytest.approx(0.5)
    np.testing.assert_array_equal(same, small)
    with pytest.raises(ValidationError):
        clip_by_l2(small, 0.0)
    with pytest.raises(ValidationError):
        clip_by_l2(np.array([np.nan]), 1.0)


def test_gaussian_noise_has_the_right_moments_and_is_unpredictable() -> None:
    z = gaussian_noise((200_000,), 3.0)
    assert abs(z.mean()) < 0.05
    assert z.std() == pytest.approx(3.0, rel=0.02)
    # Tails of a normal: ~4.55% beyond 2 sigma.
    assert np.mean(np.abs(z) > 6.0) == pytest.approx(0.0455, abs=0.004)
    assert not np.array_equal(gaussian_noise(10, 1.0), gaussian_noise(10, 1.0))
    assert gaussian_noise((3, 5), 1.0).shape == (3, 5)
    assert gaussian_noise(7, 1.0).shape == (7,)


def test_gaussian_noise_is_a_pure_function_of_the_byte_source() -> None:
    stream = bytes(range(256)) * 10

    def fixed(n: int) -> bytes:
        return stream[:n]

    a = gaussian_noise(9, 2.0, source=fixed)
    b = gaussian_noise(9, 2.0, source=fixed)
    np.testing.assert_array_equal(a, b)
    assert np.all(np.isfinite(a))


def test_noise_shares_sum_to_the_target_noise() -> None:
    n, sigma, c = 16, 1.2, 0.5
    std = noise_share_std(sigma, c, n)
    assert std == pytest.approx(sigma * c / 4)
    total = sum(gaussian_noise(50_000, std) for _ in range(n))
    assert total.std() == pytest.approx(sigma * c, rel=0.03)
    with pytest.raises(ValidationError):
        noise_share_std(sigma, c, 0)


def test_privatize_update_clips_then_noises() -> None:
    upd = np.full(10_000, 5.0)
    out = privatize_update(upd, max_norm=1.0, noise_multiplier=1e-9, num_clients=1)
    assert np.linalg.norm(out) == pytest.approx(1.0, rel=1e-6)
    noisy = privatize_update(upd, max_norm=1.0, noise_multiplier=2.0, num_clients=4)
    assert (noisy - out).std() == pytest.approx(1.0, rel=0.05)


def test_accountant_matches_the_closed_form_and_composes() -> None:
    # One Gaussian release: RDP alpha/(2 sigma^2); eps(alpha) by Balle et al. 2020's conversion.
    sigma, delta = 1.0, 1e-5
    acc = GaussianAccountant(delta=delta)
    one = acc.step(sigma)
    expected = min(
        a / (2 * sigma**2) + math.log((a - 1) / a) - (math.log(delta) + math.log(a)) / (a - 1)
        for a in acc.orders
    )
    assert one == pytest.approx(expected)
    assert acc.epsilon() == pytest.approx(one)
    acc.step(sigma)
    assert one < acc.epsilon() < 2 * one
    assert gaussian_epsilon(sigma, 2, delta) == pytest.approx(acc.epsilon())
    assert gaussian_epsilon(4.0, 1, delta) < gaussian_epsilon(1.0, 1, delta)
    assert gaussian_epsilon(1.0, 0, delta) == 0.0
    assert "epsilon" in repr(acc)
    with pytest.raises(ValidationError):
        GaussianAccountant(delta=0.0)
    with pytest.raises(ValidationError):
        acc.step(0.0)


def test_accountant_agrees_with_opacus_rdp_at_full_participation() -> None:
    from opacus.accountants import RDPAccountant

    ref = RDPAccountant()
    ref.history = [(1.1, 1.0, 5)]
    ours = gaussian_epsilon(1.1, 5, 1e-5)
    assert ours == pytest.approx(ref.get_epsilon(delta=1e-5), rel=0.05)
