"""Auditing DP-SGD on ``v`` with canaries in one training run (Steinke, Nasr & Jagielski 2023).

Threat model: the auditor controls ``m`` canary clips, flips a fair coin for each to include it in the
training set or not, sees the trained ``v`` (and the ``v`` it started from) and guesses, for the canaries it
is most sure about, which were included. If training is ``(epsilon, delta)``-DP, their main theorem bounds the
number ``W`` of correct guesses among ``r`` guesses, with ``B ~ Binomial(r, e^eps / (1 + e^eps))``::

    P[W >= v] <= P[B >= v] + 2 m delta * max_{1 <= i <= v} P[v - i <= B < v] / i

so a count of correct guesses that would be too unlikely under a claimed epsilon proves, at the chosen
confidence, that the run is *not* ``epsilon``-DP: the largest such epsilon is the empirical lower bound
(:func:`empirical_epsilon`). An audit must never find a lower bound above the accountant's epsilon; a broken
"DP" run (noise or clipping off) must be caught by a bound above it.

Canaries (:func:`dirac_canaries`) are clips whose every frame is a large spike on one feature coordinate,
each canary on its own coordinate, with a random label: the first layer of ``v`` can memorize each one
independently.
The score of a canary is how much training raised its logit-scaled confidence in its label, minus the median
of that rise over the canaries of the same label: training moves every canary of a class together (the
class's bias, its share of the data), which says nothing about membership. The score uses only the models and
the canaries, never the inclusion coins, as the theorem requires.

What one run can certify is limited by ``r`` and, through the ``2 m delta`` term, by delta: with every guess
right the bound is ``empirical_epsilon(m=m, r=r, v=r, delta=delta)`` (:func:`max_certifiable_epsilon`):
4.17 for 1,000 canaries and 200 guesses at delta = 1e-5, and never above about 8.2 at that delta however
many canaries (it passes 8.0 only from about 20,000 canaries, all guessed right). So a one-run audit cannot
refute an epsilon = 8 claim at delta = 1e-5; it refutes claims far below the run's real leakage.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from torch import nn

from fedfer.security.errors import ValidationError
from tests.privacy.attacks._stats import binomial_pmf

__all__ = [
    "CanaryAuditResult",
    "dirac_canaries",
    "empirical_epsilon",
    "max_certifiable_epsilon",
    "one_run_audit",
    "one_run_p_value",
]


def _binomial_pmf(r: int, epsilon: float) -> np.ndarray:
    """``P[B = k]`` for ``k = 0..r``, ``B ~ Binomial(r, e^eps / (1 + e^eps))``, computed in log space."""
    log_q = -math.log1p(math.exp(-epsilon))  # log(e^eps / (1 + e^eps)), stable for large eps
    return binomial_pmf(r, log_p=log_q, log_1mp=-epsilon + log_q)  # log(1 / (1 + e^eps)) = -eps + log q


def one_run_p_value(*, m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """Upper bound on ``P[W >= v]`` for an ``(epsilon, delta)``-DP run (the paper's main theorem).

    Args:
        m: canaries, each included independently with probability 1/2.
        r: guesses made (abstentions excluded).
        v: correct guesses observed.
        epsilon: the DP epsilon of the null hypothesis (>= 0).
        delta: the DP delta of the null hypothesis, in ``[0, 1]``.

    Returns:
        The p-value, capped at 1.
    """
    if not (type(m) is int and type(r) is int and type(v) is int and 0 <= v <= r <= m):
        raise ValidationError("need integers 0 <= v <= r <= m")
    if not (math.isfinite(epsilon) and epsilon >= 0 and 0.0 <= delta <= 1.0):
        raise ValidationError("epsilon must be finite and >= 0, delta in [0, 1]")
    # B's success probability e^eps / (1 + e^eps) is the accuracy of epsilon-DP randomized response.
    pmf = _binomial_pmf(r, epsilon)
    tail = float(pmf[v:].sum())
    if delta == 0.0 or v == 0:
        return min(1.0, tail)
    # max over i of P[v - i <= B < v] / i, with the window sums taken as cumulative sums of the pmf.
    below = pmf[v - 1 :: -1]  # pmf at v-1, v-2, ..., 0
    window = np.cumsum(below) / np.arange(1, v + 1)
    return min(1.0, tail + 2.0 * m * delta * float(window.max()))


def empirical_epsilon(*, m: int, r: int, v: int, delta: float, confidence: float = 0.95) -> float:
    """The largest epsilon the observation rejects at ``confidence``: an empirical lower bound on epsilon.

    Returns 0 when even epsilon = 0 is not rejected.
    """
    if not 0.0 < confidence < 1.0:
        raise ValidationError("confidence must lie in (0, 1)")
    alpha = 1.0 - confidence

    def rejected(eps: float) -> bool:
        return one_run_p_value(m=m, r=r, v=v, epsilon=eps, delta=delta) < alpha

    if not rejected(0.0):
        return 0.0
    lo, hi = 0.0, 1.0
    while rejected(hi):
        lo, hi = hi, hi * 2.0
        if hi > 200:  # a bound this large only happens with r huge and every guess right
            return lo
    for _ in range(50):
        mid = (lo + hi) / 2.0
        lo, hi = (mid, hi) if rejected(mid) else (lo, mid)
    return lo


def max_certifiable_epsilon(*, m: int, r: int, delta: float, confidence: float = 0.95) -> float:
    """The largest lower bound an audit with ``m`` canaries and ``r`` guesses can give: every guess right."""
    return empirical_epsilon(m=m, r=r, v=r, delta=delta, confidence=confidence)


def dirac_canaries(
    m: int, *, clip_len: int, num_classes: int, magnitude: float, feature_dim: int = 1280, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """``m`` canary clips: canary ``i`` is ``magnitude`` on coordinate ``c_i`` (distinct) in every frame.

    Returns:
        ``(clips (m, T, D) float32, labels (m,) int64)``.
    """
    if type(m) is not int or not 1 <= m <= feature_dim:
        raise ValidationError("m must be an int in [1, feature_dim]")
    if type(clip_len) is not int or clip_len < 1 or not magnitude > 0:
        raise ValidationError("clip_len must be a positive int and magnitude positive")
    rng = np.random.default_rng(seed)
    coords = rng.permutation(feature_dim)[:m]
    clips = np.zeros((m, clip_len, feature_dim), dtype=np.float32)
    clips[np.arange(m), :, coords] = magnitude
    labels = rng.integers(0, num_classes, size=m).astype(np.int64)
    return clips, labels


@dataclass(frozen=True)
class CanaryAuditResult:
    """Outcome of one audit.

    Attributes:
        m: canaries.
        included: how many the coin put in the training set.
        guesses: ``r``, guesses made.
        correct: ``v``, correct guesses.
        empirical_epsilon: the lower bound at ``confidence``.
        claimed_epsilon: the accountant's epsilon for the run (``inf`` if it claims nothing).
        delta: the run's delta.
        confidence: the audit's confidence.
    """

    m: int
    included: int
    guesses: int
    correct: int
    empirical_epsilon: float
    claimed_epsilon: float
    delta: float
    confidence: float

    def as_dict(self) -> dict[str, float]:
        """The figures as a flat dict for the audit report."""
        return {k: float(v) for k, v in self.__dict__.items()}


# train(clips, labels) -> (trained model, claimed epsilon)
TrainFn = Callable[[np.ndarray, np.ndarray], tuple[nn.Module, float]]


def one_run_audit(
    train: TrainFn,
    *,
    initial: nn.Module,
    data_clips: np.ndarray,
    data_labels: np.ndarray,
    canary_clips: np.ndarray,
    canary_labels: np.ndarray,
    guesses_each_side: int,
    delta: float,
    confidence: float = 0.95,
    seed: int = 0,
) -> CanaryAuditResult:
    """Insert each canary with probability 1/2, train once, score, guess and bound epsilon.

    Args:
        train: runs the training under audit on ``(clips, labels)`` and returns the model and its claimed
            epsilon at ``delta``.
        initial: the model training starts from (scores are improvements over it).
        data_clips: the ordinary training clips ``(N, T, D)``.
        data_labels: their labels.
        canary_clips: ``(m, T, D)`` canaries.
        canary_labels: their labels.
        guesses_each_side: ``k``: guess "in" for the top-k scores and "out" for the bottom-k.
        delta: the run's delta.
        confidence: confidence of the lower bound.
        seed: seeds the inclusion coins (an audit's coins are not secrets).

    Returns:
        The audit's figures.
    """
    from tests.privacy.attacks.membership import logit_confidence

    m = len(canary_clips)
    if type(guesses_each_side) is not int or not 1 <= guesses_each_side <= m // 2:
        raise ValidationError("guesses_each_side must be an int in [1, m/2]")
    rng = np.random.default_rng(seed)
    included = rng.random(m) < 0.5
    clips = np.concatenate([data_clips, canary_clips[included]]).astype(np.float32)
    labels = np.concatenate([data_labels, canary_labels[included]]).astype(np.int64)
    order = rng.permutation(len(clips))
    model, claimed = train(clips[order], labels[order])
    scores = logit_confidence(model, canary_clips, canary_labels) - logit_confidence(
        initial, canary_clips, canary_labels
    )
    for label in np.unique(canary_labels):
        same = canary_labels == label
        scores[same] -= np.median(scores[same])
    ranked = np.argsort(scores, kind="stable")
    k = guesses_each_side
    correct = int((~included[ranked[:k]]).sum() + included[ranked[-k:]].sum())
    eps_lb = empirical_epsilon(m=m, r=2 * k, v=correct, delta=delta, confidence=confidence)
    return CanaryAuditResult(
        m=m,
        included=int(included.sum()),
        guesses=2 * k,
        correct=correct,
        empirical_epsilon=eps_lb,
        claimed_epsilon=float(claimed),
        delta=delta,
        confidence=confidence,
    )
