"""DP-SGD for on-device personalization through Opacus, with a per-device privacy budget.

:class:`DPConfig` chooses the noise either by a target epsilon (``make_private_with_epsilon``) or by a noise
multiplier (``make_private``), plus delta and the per-sample clipping norm. :class:`PrivacyBudget` persists
the device's accountant history (``(noise_multiplier, sample_rate, steps)`` entries) in a JSON file,
recomputes the cumulative epsilon with Opacus' RDP accountant, and refuses a run that would exceed the limit
*before* any step is taken (:class:`~agent.learning.errors.PrivacyBudgetExceededError`).

Limitation: Opacus draws its per-sample Gaussian noise from torch's generator unless ``secure_mode=True``,
which needs ``torchcsprng`` (not available for this torch build). The noise of on-device DP-SGD is therefore
not cryptographically unpredictable; the user-level noise added to federated updates
(:mod:`security.dp`) is, as it comes from the OS CSPRNG.
"""

from __future__ import annotations

import functools
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedfer.agent.learning.errors import PrivacyBudgetExceededError
from fedfer.agent.learning.export import atomic_write
from fedfer.security.errors import ValidationError

__all__ = ["DPConfig", "PrivacyBudget", "noise_for_target", "rdp_epsilon"]


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


class PrivacyBudget:
    """A device's DP budget, persisted as JSON at ``path`` (created on first spend).

    Args:
        path: the budget file (per device; e.g. in the agent's state folder).
        epsilon_limit: total epsilon the device may spend.
        delta: the delta every epsilon is reported at.
    """

    def __init__(self, *, path: Path, epsilon_limit: float, delta: float = 1e-5) -> None:
        if not isinstance(epsilon_limit, int | float) or not 0 < epsilon_limit < math.inf:
            raise ValidationError("epsilon_limit must be a positive finite number")
        if not isinstance(delta, float) or not 0.0 < delta < 1.0:
            raise ValidationError("delta must be a float in (0, 1)")
        self.path = Path(path)
        self.epsilon_limit = float(epsilon_limit)
        self.delta = delta
        self.history: list[tuple[float, float, int]] = []
        self.runs: list[dict[str, Any]] = []
        if self.path.is_file():
            self._load()

    def _load(self) -> None:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            self.history = [(float(s), float(q), int(n)) for s, q, n in data["history"]]
            self.runs = list(data.get("runs", []))
            kept_at = float(data["delta"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValidationError("privacy budget file is unreadable") from exc
        if kept_at != self.delta:
            raise ValidationError("privacy budget file was kept at a different delta")

    def spent(self) -> float:
        """Cumulative epsilon spent so far (RDP composition over every recorded step)."""
        return rdp_epsilon(self.history, self.delta)

    def remaining(self) -> float:
        """Epsilon left before the limit (never negative)."""
        return max(self.epsilon_limit - self.spent(), 0.0)

    def check(self, planned: list[tuple[float, float, int]] | None = None) -> float:
        """Raise if the budget is spent, or would be by ``planned`` steps; else the epsilon after them.

        Raises:
            PrivacyBudgetExceededError: no budget left for this run.
        """
        spent = self.spent()
        if spent >= self.epsilon_limit:
            raise PrivacyBudgetExceededError("the device's privacy budget is spent; DP training refused")
        after = rdp_epsilon(self.history + list(planned or []), self.delta)
        if after > self.epsilon_limit + 1e-9:
            raise PrivacyBudgetExceededError("this run would exceed the device's privacy budget; refused")
        return after

    def record(self, steps: list[tuple[float, float, int]], *, note: str = "") -> float:
        """Persist a finished run's accountant history (atomically); returns the new cumulative epsilon."""
        self.history.extend((float(s), float(q), int(n)) for s, q, n in steps)
        total = self.spent()
        self.runs.append({"time": time.time(), "epsilon_total": total, "note": note})
        data = {
            "delta": self.delta,
            "epsilon_limit": self.epsilon_limit,
            "history": self.history,
            "runs": self.runs,
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, json.dumps(data).encode("utf-8"))
        return total

    def __repr__(self) -> str:
        return f"PrivacyBudget(spent={self.spent():.3f}, limit={self.epsilon_limit:g}, delta={self.delta:g})"
