"""DP auditing of ``v``'s DP-SGD with canaries in one training run (Steinke, Nasr & Jagielski 2023).

Threat model: an auditor who plants ``m = 1000`` canary clips (each included with probability 1/2), sees the
trained ``v`` and the ``v`` it started from, and guesses membership for the 100 canaries it is surest are in
and the 100 it is surest are out. The number of correct guesses is turned into an empirical lower bound on
epsilon (:func:`tests.privacy.attacks.empirical_epsilon`), at 95% confidence. Guarantee: the lower bound never
exceeds the accountant's epsilon. Teeth: runs whose claim is far below their real privacy loss are caught
(lower bound above the claim): noise calibrated for epsilon = 20 but claimed as epsilon = 1, noise off, and
clipping off with the noise of the claimed clipping bound. Training is the device's own fine-tuning
(``fedfer.agent.learning.personalize``), except the noise-off run, which the learner refuses to configure.

Limit (asserted below): 200 guesses certify at most epsilon 4.17 at delta = 1e-5, and no number of canaries
takes a one-run bound much past 8.2 at that delta (the ``2 m delta`` term), so no one-run audit can refute an
epsilon = 8 claim; an honest epsilon = 8 run is audited, for the record, under ``--audit-full`` only.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedfer.security.errors import ValidationError
from tests.privacy.attacks import (
    DPSpec,
    dirac_canaries,
    empirical_epsilon,
    max_certifiable_epsilon,
    one_run_audit,
    one_run_p_value,
    train_video_model,
)
from tests.privacy.conftest import CLIP_LEN, NUM_CLASSES, Population

M = 1000  # canaries (Dirac canaries need distinct coordinates: at most 1,280)
GUESSES = 100  # per side: r = 200 guesses
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
    audit_report.record(
        "canary_audit_dp_eps1",
        **result.as_dict(),
        noise_multiplier=sigmas[0],
        clip=CLIP,
        epochs=EPOCHS,
        max_certifiable_epsilon=max_certifiable_epsilon(m=M, r=2 * GUESSES, delta=DELTA),
    )
    return result, sigmas[0]


def test_dp_sgd_passes_the_one_run_audit(honest_run) -> None:
    """Empirical epsilon (lower bound) <= the accountant's epsilon for a real DP-SGD run."""
    result, _ = honest_run
    assert result.claimed_epsilon <= 1.0 + 1e-6
    # The check can fail: this audit can certify up to 4.17.
    assert max_certifiable_epsilon(m=M, r=2 * GUESSES, delta=DELTA) > 4 * result.claimed_epsilon
    assert result.empirical_epsilon <= result.claimed_epsilon, result


def test_noise_for_a_large_epsilon_claimed_as_1_fails_the_audit(population: Population, audit_report) -> None:
    """The learner's DP-SGD with noise calibrated for epsilon 20, reported as epsilon 1, is caught."""
    sigmas: list[float] = []
    result = _audit(population, DPSpec(target_epsilon=20.0, delta=DELTA, max_grad_norm=CLIP), sigmas)
    audit_report.record(
        "canary_audit_eps20_noise_claimed_eps1",
        **{**result.as_dict(), "claimed_epsilon": 1.0},
        accountant_epsilon=result.claimed_epsilon,
        noise_multiplier=sigmas[0],
    )
    assert 19.0 <= result.claimed_epsilon <= 20.0 + 1e-6  # what the accountant really says of this noise
    assert result.empirical_epsilon > 1.0, result


@pytest.mark.parametrize("broken", ["noise_off", "clipping_off"])
def test_audit_catches_a_broken_dp_run(population: Population, honest_run, audit_report, broken: str) -> None:
    """A run that claims the honest run's epsilon but adds no noise / does not clip is caught."""
    honest, sigma = honest_run
    if broken == "noise_off":  # the learner refuses sigma = 0, so this run uses the attack's own loop
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


def test_one_run_audit_cannot_refute_epsilon_8_at_this_delta(
    population: Population, audit_report, audit_full: bool
) -> None:
    """The ceiling of the method: every guess right, at delta = 1e-5 and 95% confidence.

    With ``--audit-full`` an honest epsilon = 8 run is audited too, for the record.
    """
    ceilings = {
        f"m{m}_r{r}": max_certifiable_epsilon(m=m, r=r, delta=DELTA)
        for m, r in ((256, 64), (M, 2 * GUESSES), (M, M), (20_000, 20_000), (40_000, 40_000))
    }
    audit_report.record("canary_audit_ceiling_delta_1e-5", **ceilings)
    assert ceilings[f"m{M}_r{2 * GUESSES}"] == pytest.approx(4.166, abs=1e-3)
    assert ceilings["m256_r64"] == pytest.approx(3.031, abs=1e-3)  # the audit's former setting
    assert ceilings["m20000_r20000"] > 8.0 > ceilings[f"m{M}_r{M}"]
    assert ceilings["m40000_r40000"] < 8.3  # the 2 m delta term: more canaries barely help
    if audit_full:
        result = _audit(population, DPSpec(target_epsilon=8.0, delta=DELTA, max_grad_norm=CLIP), [])
        audit_report.record("canary_audit_dp_eps8", **result.as_dict())
        assert result.empirical_epsilon <= result.claimed_epsilon, result


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
