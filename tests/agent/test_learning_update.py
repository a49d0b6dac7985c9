"""v updates with user-level DP: clipped over all arrays, noise shares sum to the intended noise."""

from __future__ import annotations

import numpy as np
import pytest

from agent.learning.update import apply_update, model_delta, private_delta
from agent.models import VideoModel, to_named_arrays
from security.dp import GaussianAccountant
from security.errors import ValidationError


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
