"""Binomial probabilities and exact (Clopper-Pearson) confidence bounds, in log space and without scipy.

Shared by the membership checks (confidence bounds on a TPR or FPR measured over many candidates) and the
one-run canary audit (tails of ``Binomial(r, e^eps / (1 + e^eps))``).
"""

from __future__ import annotations

import math

import numpy as np

from fedfer.security.errors import ValidationError

__all__ = ["binomial_pmf", "clopper_pearson"]


def binomial_pmf(n: int, *, log_p: float, log_1mp: float) -> np.ndarray:
    """``P[B = k]`` for ``k = 0..n``, ``B ~ Binomial(n, p)``, from ``log p`` and ``log(1 - p)``.

    Taking both logarithms lets callers pass ``p`` within 1e-300 of 0 or 1 without cancellation.
    """
    k = np.arange(n + 1, dtype=np.float64)
    # log C(n, k) = sum_{j <= k} log((n - j + 1) / j), vectorized (exact to ~1e-12 for n in the millions)
    log_choose = np.concatenate([[0.0], np.cumsum(np.log(n - k[1:] + 1) - np.log(k[1:]))])
    with np.errstate(invalid="ignore"):  # 0 * -inf at the ends when p is exactly 0 or 1
        terms = log_choose + np.nan_to_num(k * log_p, nan=0.0) + np.nan_to_num((n - k) * log_1mp, nan=0.0)
    pmf: np.ndarray = np.exp(terms)
    return pmf


def _upper_tail(n: int, k: int, p: float) -> float:
    """``P[Binomial(n, p) >= k]``."""
    if p <= 0.0:
        return 1.0 if k <= 0 else 0.0
    if p >= 1.0:
        return 1.0
    pmf = binomial_pmf(n, log_p=math.log(p), log_1mp=math.log1p(-p))
    return float(min(1.0, pmf[k:].sum()))


def clopper_pearson(k: int, n: int, *, alpha: float) -> tuple[float, float]:
    """Exact one-sided bounds on a binomial proportion from ``k`` successes in ``n`` trials.

    Returns ``(lower, upper)``: ``P[p < lower] <= alpha`` and ``P[p > upper] <= alpha`` (each one-sided at
    level ``alpha``; together a ``1 - 2 alpha`` interval).

    Raises:
        ValidationError: not ``0 <= k <= n`` integers with ``n >= 1``, or ``alpha`` outside ``(0, 1/2)``.
    """
    if not (type(k) is int and type(n) is int and 0 <= k <= n and n >= 1):
        raise ValidationError("need integers 0 <= k <= n, n >= 1")
    if not 0.0 < alpha < 0.5:
        raise ValidationError("alpha must lie in (0, 1/2)")

    lower, upper = 0.0, 1.0
    if k > 0:  # P[B >= k | p] grows with p: lower solves P[B >= k | lower] = alpha
        lo, hi = 0.0, 1.0
        for _ in range(60):
            mid = (lo + hi) / 2.0
            lo, hi = (lo, mid) if _upper_tail(n, k, mid) > alpha else (mid, hi)
        lower = lo
    if k < n:  # P[B <= k | p] falls with p: upper solves P[B <= k | upper] = alpha
        lo, hi = 0.0, 1.0
        for _ in range(60):
            mid = (lo + hi) / 2.0
            lo, hi = (mid, hi) if 1.0 - _upper_tail(n, k + 1, mid) > alpha else (lo, mid)
        upper = hi
    return lower, upper
