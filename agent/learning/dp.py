"""DP-SGD for on-device personalization through Opacus: the settings and the accountant's arithmetic.

:class:`DPConfig` chooses the noise either by a target epsilon (``make_private_with_epsilon``) or by a noise
multiplier (``make_private``), plus delta and the per-sample clipping norm. :func:`rdp_epsilon` composes an
Opacus RDP accountant history; the device's budget over runs is
:class:`fedfer.agent.learning.ledger.PrivacyBudget`, which refuses a run that would exceed its limit *before*
any step is taken.

Limitation: Opacus draws its per-sample Gaussian noise from torch's generator unless ``secure_mode=True``,
which needs ``torchcsprng`` (not available for this torch build). The noise of on-device DP-SGD is therefore
not cryptographically unpredictable; the user-level noise added to federated updates
(:mod:`fedfer.security.dp`) is, as it comes from the OS CSPRNG.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from fedfer.security.errors import ValidationError

__all__ = ["DPConfig", "noise_for_target", "rdp_epsilon"]


@dataclass(frozen=True, slots=True, kw_only=True)
class DPConfig:
    """DP-SGD settings: exactly one of ``target_epsilon`` and ``noise_multiplier``.

    Attributes:
        target_epsilon: epsilon this run may spend (Opacus picks the noise multiplier).
        noise_multiplier: fixed noise multiplier sigma instead.
        delta: target delta.
        max_grad_norm: per-sample gradient clipping norm.
    """

    target_epsilon: float | None = 8.0
    noise_multiplier: float | None = None
    delta: float = 1e-5
    max_grad_norm: float = 1.0

    def __post_init__(self) -> None:
        if (self.target_epsilon is None) == (self.noise_multiplier is None):
            raise ValidationError("give exactly one of target_epsilon and noise_multiplier")
        for name in ("target_epsilon", "noise_multiplier"):
            value = getattr(self, name)
            if value is not None and (
                not isinstance(value, int | float) or not math.isfinite(value) or value <= 0
            ):
                raise ValidationError(f"{name} must be a positive finite number")
        if not isinstance(self.delta, float) or not 0.0 < self.delta < 1.0:
            raise ValidationError("delta must be a float in (0, 1)")
        if not isinstance(self.max_grad_norm, int | float) or not 0 < self.max_grad_norm < math.inf:
            raise ValidationError("max_grad_norm must be positive")


@functools.lru_cache(maxsize=256)
def _history_epsilon(history: tuple[tuple[float, float, int], ...], delta: float) -> float:
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history = list(history)
    return float(acc.get_epsilon(delta=delta))


def rdp_epsilon(history: list[tuple[float, float, int]], delta: float) -> float:
    """Cumulative epsilon of an Opacus RDP accountant history at ``delta`` (0.0 for no history).

    Memoized: the RDP of fractional orders is slow to evaluate (about half a second per history on this
    CPU) and a run asks for the same history several times (budget check, report, record).
    """
    if not history:
        return 0.0
    return _history_epsilon(tuple((float(s), float(q), int(n)) for s, q, n in history), float(delta))


@functools.lru_cache(maxsize=64)
def noise_for_target(target_epsilon: float, delta: float, sample_rate: float, epochs: int) -> float:
    """The noise multiplier Opacus' ``make_private_with_epsilon`` would choose (same search), memoized.

    The search evaluates the accountant a dozen times; devices and benchmarks that personalize again with the
    same settings and data size get the answer at once.
    """
    from opacus.accountants.utils import get_noise_multiplier

    return float(
        get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            epochs=epochs,
            accountant="rdp",
        )
    )
