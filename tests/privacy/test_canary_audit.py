"""DP auditing of ``v``'s DP-SGD with canaries in one training run (Steinke, Nasr & Jagielski 2023).

Threat model: an auditor who plants ``m`` canary clips (each included with probability 1/2), sees the trained
``v`` and the ``v`` it started from, and guesses membership for the canaries it is surest about. The number of
correct guesses is turned into an empirical lower bound on epsilon (:func:`agent.attacks.empirical_epsilon`),
at 95% confidence. Guarantee: the lower bound never exceeds the accountant's epsilon. Teeth: the same audit
of a broken "DP" run (noise off, or clipping off with the noise of the claimed clipping bound) finds a lower
bound above the claimed epsilon. Training is the device's own fine-tuning (``agent.learning.personalize``),
except the noise-off run, which the learner refuses to configure.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from agent.attacks import (
    DPSpec,
    dirac_canaries,
    empirical_epsilon,
    one_run_audit,
    one_run_p_value,
    train_video_model,
)
from security.errors import ValidationError
from tests.privacy.conftest import CLIP_LEN, NUM_CLASSES, Population

M = 256  # canaries
GUESSES = M // 8  # per side
DELTA = 1e-5
CLIP = 0.1  # per-sample clipping bound C of the audited runs
EPOCHS = 10
LR = 5e-3
_UNCLIPPED = 1e4


def _trainer(population: Population, spec: DPSpec, claimed: list[float], engine: str):
    def train(clips: np.ndarray, labels: np.ndarray):
        run = train_video_model(
            clips,
            labels,
            num_classes=NUM_CLASSES,
            epochs=EPOCHS,
            lr=LR,
            batch_size=32,
            init=population.init,
            dp=spec,
            seed=4,
            engine=engine,
        )
        claimed.append(run.noise_multiplier or 0.0)
        return run.model, float(run.epsilon if run.epsilon is not None else math.inf)

    return train


def _audit(population: Population, spec: DPSpec, claimed: list[float], engine: str = "learner"):
    canaries, canary_labels = dirac_canaries(
        M, clip_len=CLIP_LEN, num_classes=NUM_CLASSES, magnitude=30.0, seed=9
    )
    clips, labels = population.pool
    return one_run_audit(
        _trainer(population, spec, claimed, engine),
        initial=population.model,
        data_clips=clips,
        data_labels=labels,
        canary_clips=canaries,
        canary_labels=canary_labels,
        guesses_each_side=GUESSES,
        delta=DELTA,
        seed=2,
    )


@pytest.fixture(scope="module")
def honest_run(population: Population, audit_report):
    """The proper DP-SGD run (claimed epsilon 1) and its noise multiplier."""
    sigmas: list[float] = []
    result = _audit(population, DPSpec(target_epsilon=1.0, delta=DELTA, max_grad_norm=CLIP), sigmas)
    audit_report.record("canary_audit_dp_eps1", **result.as_dict(), noise_multiplier=sigmas[0], clip=CLIP)
    return result, sigmas[0]


def test_dp_sgd_passes_the_one_run_audit(honest_run) -> None:
    """Empirical epsilon (lower bound) <= the accountant's epsilon for a real DP-SGD run."""
    result, _ = honest_run
    assert result.claimed_epsilon <= 1.0 + 1e-6
    assert result.empirical_epsilon <= result.claimed_epsilon, result


def test_dp_sgd_eps8_passes_the_one_run_audit(population: Population, audit_report) -> None:
    """Same audit at a looser budget (epsilon 8)."""
    result = _audit(population, DPSpec(target_epsilon=8.0, delta=DELTA, max_grad_norm=CLIP), [])
    audit_report.record("canary_audit_dp_eps8", **result.as_dict())
    assert result.empirical_epsilon <= result.claimed_epsilon, result


@pytest.mark.parametrize("broken", ["noise_off", "clipping_off"])
def test_audit_catches_a_broken_dp_run(population: Population, honest_run, audit_report, broken: str) -> None:
    """A run that claims the honest run's epsilon but adds no noise / does not clip is caught."""
    honest, sigma = honest_run
    if (
        broken == "noise_off"
    ):  # the device's learner refuses sigma = 0, so this run uses the attack's own loop
        spec = DPSpec(noise_multiplier=0.0, delta=DELTA, max_grad_norm=CLIP)
        engine = "opacus"
    else:  # the learner itself, with noise std sigma*C as claimed but per-sample gradients never clipped
        spec = DPSpec(noise_multiplier=sigma * CLIP / _UNCLIPPED, delta=DELTA, max_grad_norm=_UNCLIPPED)
        engine = "learner"
    result = _audit(population, spec, [], engine)
    audit_report.record(
        f"canary_audit_broken_{broken}",
        **{**result.as_dict(), "claimed_epsilon": honest.claimed_epsilon},
    )
    assert result.empirical_epsilon > honest.claimed_epsilon, result


def test_bound_matches_closed_form_for_pure_dp() -> None:
    """With delta = 0 and every guess right, P[W >= r] = q^r, so the bound solves q^r = 0.05 exactly."""
    for r in (10, 64, 200):
        q = 0.05 ** (1.0 / r)
        expected = math.log(q / (1.0 - q))
        got = empirical_epsilon(m=1000, r=r, v=r, delta=0.0, confidence=0.95)
        assert got == pytest.approx(expected, abs=1e-6)


def test_bound_properties() -> None:
    """More correct guesses, a larger delta or a lower confidence move the bound the right way."""
    low = empirical_epsilon(m=1000, r=100, v=70, delta=1e-5)
    high = empirical_epsilon(m=1000, r=100, v=90, delta=1e-5)
    assert 0.0 < low < high
    assert empirical_epsilon(m=1000, r=100, v=90, delta=1e-3) < high
    assert empirical_epsilon(m=1000, r=100, v=50, delta=1e-5) == 0.0
    assert one_run_p_value(m=1000, r=100, v=90, epsilon=high + 0.01, delta=1e-5) >= 0.05
    with pytest.raises(ValidationError):
        one_run_p_value(m=10, r=20, v=5, epsilon=1.0, delta=0.0)
