"""The device's privacy ledgers: what its private computations have spent, kept on disk, with a limit that
refuses the next one before it runs.

One ledger, two accountings:

* :class:`PrivacyBudget`: DP-SGD personalization runs. Each run adds Opacus' RDP accountant history,
  ``(noise_multiplier, sample_rate, steps)`` entries, composed by
  :func:`fedfer.agent.learning.dp.rdp_epsilon`.
* :class:`RoundBudget`: federated rounds under user-level DP. Each round adds one Gaussian release (its
  noise multiplier), composed by :class:`fedfer.security.dp.GaussianAccountant`.

A ledger file is JSON, written through :func:`fedfer.security.files.write_atomic` (fsynced, renamed, the
directory fsynced), so a spend that was reported survives a crash or power loss. It is bound to its delta;
an unreadable file or one kept at another delta is an error, never a silent reset. ``check`` refuses a spent
budget and a run or round that would pass the limit
(:class:`~fedfer.agent.errors.PrivacyBudgetExceededError`).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, ClassVar

from fedfer.agent.errors import PrivacyBudgetExceededError
from fedfer.agent.learning.dp import rdp_epsilon
from fedfer.security.dp import GaussianAccountant, gaussian_epsilon
from fedfer.security.errors import ValidationError
from fedfer.security.files import write_atomic

__all__ = ["PrivacyBudget", "PrivacyLedger", "RoundBudget"]


class PrivacyLedger:
    """A privacy budget persisted as JSON at ``path`` (created on the first recorded spend).

    Subclasses say what an entry is (:meth:`_read`, :meth:`_document`) and how entries compose
    (:meth:`spent`); loading, saving and the refusals are the same for every ledger.

    Args:
        path: the ledger file (per device, in the agent's state directory).
        epsilon_limit: total epsilon the device may spend on what this ledger accounts.
        delta: the delta every epsilon is reported at (the file must have been kept at the same delta).

    Raises:
        ValidationError: bad limits, or an unreadable ledger file.
    """

    #: What the ledger accounts, as its messages name it.
    what: ClassVar[str] = "privacy budget"
    #: What a spent budget refuses, and what one more spend is called.
    _refusal: ClassVar[str] = "refused"
    _next: ClassVar[str] = "this run"
    _indent: ClassVar[int | None] = None

    def __init__(self, *, path: Path, epsilon_limit: float, delta: float = 1e-5) -> None:
        if (
            isinstance(epsilon_limit, bool)
            or not isinstance(epsilon_limit, int | float)
            or not 0 < epsilon_limit < math.inf
        ):
            raise ValidationError("epsilon_limit must be a positive finite number")
        GaussianAccountant(delta=delta)  # validates delta: a float in (0, 1)
        self.path = Path(path)
        self.epsilon_limit = float(epsilon_limit)
        self.delta = delta
        if self.path.is_file():
            self._load()

    def _load(self) -> None:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            self._read(data)
            kept_at = float(data["delta"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValidationError(f"{self.what} file is unreadable") from exc
        if kept_at != self.delta:
            raise ValidationError(f"{self.what} file was kept at a different delta")

    def _read(self, data: dict[str, Any]) -> None:
        """Take the entries from a loaded file (``ValueError``, ``KeyError``, ``TypeError``: malformed)."""
        raise NotImplementedError

    def _document(self) -> dict[str, Any]:
        """The file's contents besides ``delta`` and ``epsilon_limit``."""
        raise NotImplementedError

    def spent(self) -> float:
        """Cumulative epsilon of every recorded entry."""
        raise NotImplementedError

    def remaining(self) -> float:
        """Epsilon left before the limit (never negative)."""
        return max(self.epsilon_limit - self.spent(), 0.0)

    def _check(self, after: float | None) -> float:
        """Refuse a spent budget, and a next spend whose cumulative epsilon would be ``after``; return it."""
        spent = self.spent()
        if spent >= self.epsilon_limit:
            raise PrivacyBudgetExceededError(f"the device's {self.what} is spent; {self._refusal}")
        if after is None:
            return spent
        if after > self.epsilon_limit + 1e-9:
            raise PrivacyBudgetExceededError(f"{self._next} would exceed the device's {self.what}; refused")
        return after

    def _save(self) -> None:
        data = {"delta": self.delta, "epsilon_limit": self.epsilon_limit, **self._document()}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path, json.dumps(data, indent=self._indent).encode("utf-8"))


class PrivacyBudget(PrivacyLedger):
    """The DP-SGD budget of on-device personalization (see the module docstring).

    Attributes:
        history: every recorded run's accountant history, ``(noise_multiplier, sample_rate, steps)``.
        runs: one note per recorded run (time, cumulative epsilon, note).
    """

    what = "privacy budget"
    _refusal = "DP training refused"
    _next = "this run"

    def __init__(self, *, path: Path, epsilon_limit: float, delta: float = 1e-5) -> None:
        self.history: list[tuple[float, float, int]] = []
        self.runs: list[dict[str, Any]] = []
        super().__init__(path=path, epsilon_limit=epsilon_limit, delta=delta)

    def _read(self, data: dict[str, Any]) -> None:
        self.history = [(float(s), float(q), int(n)) for s, q, n in data["history"]]
        self.runs = list(data.get("runs", []))

    def _document(self) -> dict[str, Any]:
        return {"history": self.history, "runs": self.runs}

    def spent(self) -> float:
        """Cumulative epsilon spent so far (RDP composition over every recorded step)."""
        return rdp_epsilon(self.history, self.delta)

    def check(self, planned: list[tuple[float, float, int]] | None = None) -> float:
        """Raise if the budget is spent, or would be by ``planned`` steps; else the epsilon after them.

        Raises:
            PrivacyBudgetExceededError: no budget left for this run.
        """
        return self._check(rdp_epsilon(self.history + list(planned or []), self.delta))

    def record(self, steps: list[tuple[float, float, int]], *, note: str = "") -> float:
        """Persist a finished run's accountant history; returns the new cumulative epsilon."""
        self.history.extend((float(s), float(q), int(n)) for s, q, n in steps)
        total = self.spent()
        self.runs.append({"time": time.time(), "epsilon_total": total, "note": note})
        self._save()
        return total

    def __repr__(self) -> str:
        return f"PrivacyBudget(spent={self.spent():.3f}, limit={self.epsilon_limit:g}, delta={self.delta:g})"


class RoundBudget(PrivacyLedger):
    """The user-level DP budget of federated rounds (see the module docstring).

    The file lists every round's noise multiplier (and its epsilon); the cumulative epsilon is recomputed
    from them.

    Attributes:
        rounds: one entry per recorded round (time, noise multiplier, its epsilon, note).
    """

    what = "round privacy budget"
    _refusal = "joining refused"
    _next = "this round"
    _indent = 1

    def __init__(self, *, path: Path, epsilon_limit: float, delta: float = 1e-5) -> None:
        self.rounds: list[dict[str, Any]] = []
        super().__init__(path=path, epsilon_limit=epsilon_limit, delta=delta)

    def _read(self, data: dict[str, Any]) -> None:
        rounds = [dict(r) for r in data["rounds"]]
        for r in rounds:
            float(r["noise_multiplier"])
        self.rounds = rounds

    def _document(self) -> dict[str, Any]:
        return {"epsilon_total": self.spent(), "rounds": self.rounds}

    def _total(self, sigmas: list[float]) -> float:
        acc = GaussianAccountant(delta=self.delta)
        for s in sigmas:
            acc.step(s)
        return acc.epsilon()

    def _sigmas(self) -> list[float]:
        return [float(r["noise_multiplier"]) for r in self.rounds]

    def spent(self) -> float:
        """Cumulative epsilon of every recorded round."""
        return self._total(self._sigmas())

    def check(self, noise_multiplier: float | None = None) -> float:
        """Raise if the budget is spent, or would be by one more round at ``noise_multiplier``.

        Returns:
            The cumulative epsilon after that round (the current one without ``noise_multiplier``).

        Raises:
            PrivacyBudgetExceededError: no budget left for a round.
        """
        after = None if noise_multiplier is None else self._total([*self._sigmas(), float(noise_multiplier)])
        return self._check(after)

    def record(self, noise_multiplier: float, *, note: str = "") -> tuple[float, float]:
        """Persist one round; returns ``(epsilon of this round, cumulative epsilon)``."""
        sigma = float(noise_multiplier)
        one = gaussian_epsilon(sigma, 1, self.delta)
        self.rounds.append({"time": time.time(), "noise_multiplier": sigma, "epsilon": one, "note": note})
        self._save()
        return one, self.spent()

    def __repr__(self) -> str:
        return (
            f"RoundBudget(rounds={len(self.rounds)}, spent={self.spent():.3f}, limit={self.epsilon_limit:g})"
        )
