"""The v update a device contributes to a round, with optional user-level DP.

``Δv = v_personal - v_central`` over the named arrays; with user-level DP the device clips Δv in L2 (over all
arrays together) and adds its share ``sigma * C / sqrt(n)`` of Gaussian noise from the OS CSPRNG
(:func:`fedfer.security.dp.privatize_update`), so the sum secure aggregation reveals carries
``N(0, (sigma C)^2)`` when ``n`` devices contribute (distributed DP, Kairouz et al. 2021; user-level DP for
FedAvg, McMahan et al. 2018). The per-round and cumulative epsilon come from
:class:`fedfer.security.dp.GaussianAccountant`; :class:`fedfer.agent.learning.ledger.RoundBudget` keeps them
per device and refuses a round once the budget is spent.

Limits of the guarantee, stated where they matter:

* ``n`` is the *expected* number of contributors. If fewer devices survive a round, the aggregate carries
  less noise than accounted; set ``n`` to the round's minimum (the secure-aggregation threshold), or to 1
  (every device adds the whole noise) when unsure.
* Rounds are accounted as full-participation Gaussian releases (no amplification by sampling: a device does
  not know how it was sampled).
* The aggregator clips every coordinate to ``[-clip, clip]`` before quantizing; its ``clip`` must be well
  above the noise share's standard deviation (say 5x) or it would cut the noise it is meant to carry.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedfer.agent.learning.ledger import RoundBudget
from fedfer.security.dp import gaussian_epsilon, noise_share_std, privatize_update
from fedfer.security.errors import ValidationError

__all__ = [
    "RoundDPConfig",
    "apply_update",
    "model_delta",
    "noise_for_epsilon",
    "private_delta",
    "round_contribution",
]


def _check_same(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> list[str]:
    if set(a) != set(b) or any(np.shape(a[k]) != np.shape(b[k]) for k in a):
        raise ValidationError("named arrays differ in names or shapes")
    return sorted(a)


def model_delta(
    central: Mapping[str, np.ndarray], personal: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """``personal - central`` per named array (float64)."""
    return {
        k: np.asarray(personal[k], np.float64) - np.asarray(central[k], np.float64)
        for k in _check_same(central, personal)
    }


def private_delta(
    delta: Mapping[str, np.ndarray], *, max_norm: float, noise_multiplier: float, num_clients: int
) -> dict[str, np.ndarray]:
    """Clip the update to ``max_norm`` (one L2 norm over all arrays) and add this client's noise share."""
    names = sorted(delta)
    if not names:
        raise ValidationError("empty update")
    flat = np.concatenate([np.asarray(delta[k], np.float64).ravel() for k in names])
    noised = privatize_update(
        flat, max_norm=max_norm, noise_multiplier=noise_multiplier, num_clients=num_clients
    )
    out: dict[str, np.ndarray] = {}
    pos = 0
    for k in names:
        shape = np.shape(delta[k])
        size = int(np.prod(shape, dtype=np.int64))
        out[k] = noised[pos : pos + size].reshape(shape)
        pos += size
    return out


def apply_update(central: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``central + delta`` as float32 named arrays (e.g. the aggregate mean applied to the central v)."""
    return {
        k: (np.asarray(central[k], np.float64) + delta[k]).astype(np.float32)
        for k in _check_same(central, delta)
    }


def noise_for_epsilon(epsilon: float, delta: float) -> float:
    """The smallest noise multiplier whose single Gaussian release costs at most ``epsilon`` at ``delta``.

    Found by bisection on :func:`fedfer.security.dp.gaussian_epsilon` (monotone in sigma) to a relative 1e-6.

    Raises:
        ValidationError: ``epsilon`` is not a positive finite number or ``delta`` not in (0, 1).
    """
    if isinstance(epsilon, bool) or not isinstance(epsilon, int | float) or not 0 < epsilon < math.inf:
        raise ValidationError("epsilon must be a positive finite number")
    lo, hi = 1e-3, 1.0
    while gaussian_epsilon(hi, 1, delta) > epsilon:
        lo, hi = hi, hi * 2.0
        if hi > 1e6:
            raise ValidationError("epsilon is too small for any practical noise multiplier")
    while hi - lo > 1e-6 * hi:
        mid = (lo + hi) / 2.0
        if gaussian_epsilon(mid, 1, delta) > epsilon:
            lo = mid
        else:
            hi = mid
    return hi


@dataclass(frozen=True, slots=True, kw_only=True)
class RoundDPConfig:
    """User-level DP of one device's round contribution.

    Attributes:
        clip_norm: L2 bound ``C`` on the whole Δv (all arrays together).
        noise_multiplier: ``sigma`` of the Gaussian mechanism on the *sum* of the contributions.
        num_clients: expected number of contributors ``n``; this device adds ``N(0, (sigma C)^2 / n)``.
        delta: the delta every epsilon is reported at.
    """

    clip_norm: float
    noise_multiplier: float
    num_clients: int
    delta: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("clip_norm", "noise_multiplier"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
                raise ValidationError(f"{name} must be a positive finite number")
        if type(self.num_clients) is not int or self.num_clients < 1:
            raise ValidationError("num_clients must be a positive int")
        if not isinstance(self.delta, float) or not 0.0 < self.delta < 1.0:
            raise ValidationError("delta must be a float in (0, 1)")

    @classmethod
    def for_epsilon(
        cls, *, epsilon: float, clip_norm: float, num_clients: int, delta: float
    ) -> RoundDPConfig:
        """The settings whose noise makes one round cost ``epsilon`` (see :func:`noise_for_epsilon`)."""
        return cls(
            clip_norm=clip_norm,
            noise_multiplier=noise_for_epsilon(epsilon, delta),
            num_clients=num_clients,
            delta=delta,
        )

    def round_epsilon(self) -> float:
        """Epsilon of one round with these settings."""
        return gaussian_epsilon(self.noise_multiplier, 1, self.delta)


def round_contribution(
    central: Mapping[str, np.ndarray],
    personal: Mapping[str, np.ndarray],
    *,
    order: list[str],
    examples: int,
    dp: RoundDPConfig | None = None,
    budget: RoundBudget | None = None,
) -> tuple[np.ndarray, int, dict[str, Any]]:
    """What one device uploads for a round: the flat Δv in ``order`` and its weight, plus a local report.

    Without DP the update is the raw Δv weighted by ``examples`` (FedAvg's example-count weighting). With
    user-level DP, Δv is clipped to ``dp.clip_norm`` in L2, this device's noise share is added, and the
    weight is **1**: the bound ``C`` on one user's influence on the weighted mean holds only if no device
    can scale its contribution by a weight of its own choosing, so example-count weighting is off.
    The round is charged to ``budget`` *before* the update is returned (it may leave the device from then
    on; a round the device then drops out of is still counted, which errs on the safe side).

    Raises:
        PrivacyBudgetExceededError: the round budget cannot pay for this round (nothing is returned).
        ValidationError: the models do not match, or ``examples`` < 1.
    """
    if type(examples) is not int or examples < 1:
        raise ValidationError("a round contribution needs at least one example")
    delta = model_delta(central, personal)
    if sorted(order) != sorted(delta):
        raise ValidationError("the round's array order does not name the model's arrays")
    report: dict[str, Any] = {"round_dp": dp is not None}
    if dp is None:
        flat = np.concatenate([delta[k].ravel() for k in order])
        return flat, examples, report
    if budget is not None:
        budget.check(dp.noise_multiplier)
    norm = math.sqrt(sum(float(np.dot(d.ravel(), d.ravel())) for d in delta.values()))
    noised = private_delta(
        delta, max_norm=dp.clip_norm, noise_multiplier=dp.noise_multiplier, num_clients=dp.num_clients
    )
    if budget is not None:
        one, total = budget.record(dp.noise_multiplier, note="round")
    else:
        one = total = dp.round_epsilon()
    report.update(
        round_epsilon=one,
        round_epsilon_total=total,
        round_noise_multiplier=dp.noise_multiplier,
        round_noise_share_std=noise_share_std(dp.noise_multiplier, dp.clip_norm, dp.num_clients),
        round_clip_norm=dp.clip_norm,
        round_update_norm=round(norm, 6),
        round_clipped=bool(norm > dp.clip_norm),
    )
    return np.concatenate([noised[k].ravel() for k in order]), 1, report
