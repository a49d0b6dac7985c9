"""Membership inference against the personalized and the central ``v``, without and with DP-SGD.

Threat model: an adversary with query access to a released ``v`` (a device's personalized model, or the
central ``v`` after FedAvg of 4 devices), who knows the training recipe and holds data from the same
distribution, guesses whether a candidate clip was trained on. Attacks: the loss attack and offline LiRA
(:mod:`tests.privacy.attacks.membership`), with shadow models trained by the same recipe on fresh data.

Setting: every device starts from a central ``v`` trained without DP on 1,500 public clips. The target is
fine-tuned by the device's learner (``finetune_v``, Opacus DP-SGD) on ``N = 1000`` member clips: by one
device (personalized) or by 4 devices on 250 clips each, then FedAvg (central). Shadow models (2, or 8 with
``--audit-full``) repeat the recipe on fresh clips, so each is an OUT model for every candidate. Candidates
are the 1,000 members and 1,000 fresh non-members, so the TPR at 1% FPR rests on 10 allowed false
positives. Clips are drawn from :class:`tests.privacy.conftest.SyntheticFeatures`, fitted to real FER2013
MobileNetV2 features (a linear probe scores about the same on both; checked below). Every run draws its own
members.

Guarantee checked, at epsilon about 1 and 8 (delta = 1e-5). The accountant certifies
``(epsilon(delta), delta)``-DP for every delta at once (:func:`tests.privacy.attacks.privacy_profile`), and
every attack's ROC curve lies under the intersection of those hypothesis-testing regions. (The single pair
``(8, 1e-5)`` allows an AUC of 0.9997 and a TPR of 1 at 1% FPR, so alone it could never fail; the ε ≈ 8 run's
profile allows about 0.80 and 0.14.) Each attack must satisfy, at 99.9% confidence per bound
(:func:`tests.privacy.attacks.check_against_profile`):

* TPR at 1% FPR: the Clopper-Pearson lower bound on the TPR is at most the profile's TPR at the
  Clopper-Pearson upper bound on the FPR;
* AUC <= the profile's AUC bound + 3.09 sqrt(A (1 - A) / 1000) at that bound A (the AUC estimate's largest
  possible standard deviation).

The DP models must be useful (test accuracy >= 0.40, chance is 1/6), so the checks do not pass merely
because a model predicts one class; and the same checks must reject a model fine-tuned without DP.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from fedfer.agent.models.video import to_named_arrays
from tests.privacy.attacks import (
    DPSpec,
    MembershipAudit,
    check_against_profile,
    dp_auc_bound,
    dp_tpr_bound,
    membership_audit,
    train_video_model,
)
from tests.privacy.conftest import NUM_CLASSES, FeatureBank, SyntheticFeatures

DELTA = 1e-5
N = 1000  # members, and as many non-members
PUBLIC = 1500  # clips the central v is pretrained on
SHADOWS = {False: 2, True: 8}  # by --audit-full
CLIENTS = 4
ALPHA = 1e-3  # one-sided error of each confidence bound
MIN_DP_TEST_ACCURACY = 0.40
# Fine-tuning recipes. DP: small steps (Adam moves every coordinate by ~lr per step, and under DP noise most
# of that motion is noise), one or two passes. Without DP: the paper's lr, trained until it overfits.
DP_RECIPE = {"epochs": 1, "lr": 1e-4, "batch_size": 50}
NO_DP_RECIPE = {"epochs": 10, "lr": 1e-3, "batch_size": 50}
CLIP = 1.0
SEEDS = {("personalized", None): 100, ("central", None): 200, ("personalized", 8.0): 300,
         ("central", 8.0): 400, ("personalized", 1.0): 500, ("central", 1.0): 600}  # fmt: skip


class Audits:
    """Runs each (scenario, epsilon) audit once per module, on demand."""

    def __init__(self, synthetic: SyntheticFeatures, init: dict[str, np.ndarray], *, shadows: int) -> None:
        self.synthetic = synthetic
        self.init = init
        self.shadows = shadows
        self.done: dict[tuple[str, float | None], MembershipAudit] = {}

    def get(self, scenario: str, epsilon: float | None) -> MembershipAudit:
        key = (scenario, epsilon)
        if key not in self.done:
            base = SEEDS[key]
            recipe = NO_DP_RECIPE if epsilon is None else DP_RECIPE
            dp = None if epsilon is None else DPSpec(target_epsilon=epsilon, delta=DELTA, max_grad_norm=CLIP)
            self.done[key] = membership_audit(
                self.synthetic.clips(N, seed=base),
                self.synthetic.clips(N, seed=base + 1),
                [self.synthetic.clips(N, seed=base + 2 + s) for s in range(self.shadows)],
                num_classes=NUM_CLASSES,
                init=self.init,
                scenario=scenario,
                clients=CLIENTS,
                dp=dp,
                seed=base,
                **recipe,
            )
        return self.done[key]


@pytest.fixture(scope="module")
def audits(synthetic: SyntheticFeatures, audit_full: bool) -> Audits:
    """The central ``v`` pretrained on public clips, and the audits run against its fine-tuned copies."""
    clips, labels = synthetic.clips(PUBLIC, seed=1)
    central = train_video_model(clips, labels, num_classes=NUM_CLASSES, epochs=8, batch_size=32, seed=1)
    return Audits(synthetic, to_named_arrays(central.model), shadows=SHADOWS[audit_full])


def _linear_probe_accuracy(
    train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray]
) -> float:
    """Accuracy of a ridge-regression classifier (one-hot targets, penalty 100) on single frames."""
    x = train[0].astype(np.float64)
    center = x.mean(axis=0)
    targets = np.eye(NUM_CLASSES)[train[1]]
    a = x - center
    weights = np.linalg.solve(a.T @ a + 100.0 * np.eye(a.shape[1]), a.T @ (targets - targets.mean(axis=0)))
    predicted = ((test[0].astype(np.float64) - center) @ weights).argmax(axis=1)
    return float((predicted == test[1]).mean())


def test_synthetic_features_are_as_hard_as_real_ones(
    feature_bank: FeatureBank, synthetic: SyntheticFeatures, audit_report
) -> None:
    """A linear probe on single frames scores about the same on synthetic and on real features."""
    rng = np.random.default_rng(0)
    order = rng.permutation(len(feature_bank.labels))
    folds = np.array_split(order, 4)
    real = []
    for i, test_idx in enumerate(folds):
        train_idx = np.concatenate([f for j, f in enumerate(folds) if j != i])
        real.append(
            _linear_probe_accuracy(
                (feature_bank.features[train_idx], feature_bank.labels[train_idx]),
                (feature_bank.features[test_idx], feature_bank.labels[test_idx]),
            )
        )
    labels = rng.permutation(np.arange(len(order) + 1200) % NUM_CLASSES)
    frames = synthetic.frames(labels, rng=rng)
    train_n = len(folds[0]) * 3  # the same training-set size as each real fold
    fake = _linear_probe_accuracy((frames[:train_n], labels[:train_n]), (frames[-1200:], labels[-1200:]))
    audit_report.record(
        "membership_synthetic_features",
        real_probe_accuracy=float(np.mean(real)),
        real_test_frames=len(order),
        synthetic_probe_accuracy=fake,
        synthetic_test_frames=1200,
        probe_training_frames=train_n,
        chance=1 / NUM_CLASSES,
    )
    # Same difficulty within sampling error (about 0.025 for the real estimate, 0.013 for the synthetic).
    assert abs(fake - float(np.mean(real))) < 0.08, (fake, real)


def _record(audit_report, name: str, audit: MembershipAudit, **extra: Any) -> dict[str, Any]:
    figures = {**audit.figures(), **extra}
    audit_report.record(name, **figures)
    return figures


@pytest.mark.parametrize("scenario", ["personalized", "central"])
@pytest.mark.parametrize("epsilon", [8.0, 1.0])
def test_dp_bounds_membership_inference(audits: Audits, audit_report, scenario: str, epsilon: float) -> None:
    """DP-SGD at epsilon 1 and 8 on useful models: neither attack beats what the accountant certifies."""
    audit = audits.get(scenario, epsilon)
    profile = audit.profile()
    checks = {name: check_against_profile(a, profile, alpha=ALPHA) for name, a in
              (("loss", audit.loss), ("lira", audit.lira))}  # fmt: skip
    (at_delta,) = [pair for pair in profile if pair[1] == DELTA]
    figures = _record(
        audit_report,
        f"membership_{scenario}_dp_eps{epsilon:g}",
        audit,
        delta=DELTA,
        clip=CLIP,
        recipe=DP_RECIPE,
        clients=CLIENTS if scenario == "central" else 1,
        profile_epsilon_at_delta=at_delta[0],
        single_pair_auc_bound=dp_auc_bound(epsilon=epsilon, delta=DELTA),
        single_pair_tpr_bound_at_1pct_fpr=dp_tpr_bound(0.01, epsilon=epsilon, delta=DELTA),
        **{f"{name}_check": check.as_dict() for name, check in checks.items()},
    )
    # The accountant's epsilon is the one targeted, and the profile is the learner's own accounting.
    assert epsilon * 0.95 <= figures["epsilon"] <= epsilon * 1.01, figures
    assert math.isclose(at_delta[0], figures["epsilon"], rel_tol=1e-6), figures
    # A useful model, not one that predicts one class.
    assert figures["test_accuracy"] >= MIN_DP_TEST_ACCURACY, figures
    for name, check in checks.items():
        assert check.auc_allowed < 0.9 and check.tpr_allowed < 0.5, (name, check)  # the bounds can fail
        assert not check.auc_violated, (name, check)
        assert not check.tpr_violated, (name, check)


@pytest.mark.parametrize("scenario", ["personalized", "central"])
def test_without_dp_membership_leaks(audits: Audits, audit_report, scenario: str) -> None:
    """Without DP the attacks work; the check the ε ≈ 1 personalized models pass rejects that model.

    FedAvg of 4 devices' models dilutes each clip's influence: the central model still leaks significantly
    (AUC above chance by more than 3.09 null standard deviations) but need not break the ε ≈ 1 bound.
    """
    audit = audits.get(scenario, None)
    profile = audits.get(scenario, 1.0).profile()
    checks = {name: check_against_profile(a, profile, alpha=ALPHA) for name, a in
              (("loss", audit.loss), ("lira", audit.lira))}  # fmt: skip
    figures = _record(
        audit_report,
        f"membership_{scenario}_no_dp",
        audit,
        recipe=NO_DP_RECIPE,
        clients=CLIENTS if scenario == "central" else 1,
        **{f"{name}_check_against_eps1": check.as_dict() for name, check in checks.items()},
    )
    null_sd = math.sqrt((1 / figures["members"] + 1 / figures["non_members"]) / 12)
    assert max(figures["loss_auc"], figures["lira_auc"]) > 0.5 + 3.09 * null_sd, figures
    if scenario == "personalized":
        assert any(c.auc_violated or c.tpr_violated for c in checks.values()), figures


def test_bounds_known_answers() -> None:
    """The confidence bounds, the DP regions and the accountant's profile against known values."""
    from opacus.accountants import RDPAccountant

    from tests.privacy.attacks import privacy_profile, profile_auc_bound, profile_tpr_bound
    from tests.privacy.attacks._stats import clopper_pearson

    # Clopper-Pearson 95% interval for 5 of 10 (tables: 0.1871, 0.8129); the edges are exact.
    low, high = clopper_pearson(5, 10, alpha=0.025)
    assert low == pytest.approx(0.18709, abs=1e-4) and high == pytest.approx(0.81291, abs=1e-4)
    assert clopper_pearson(0, 1000, alpha=1e-3)[0] == 0.0
    assert clopper_pearson(1000, 1000, alpha=1e-3)[1] == 1.0
    # One (epsilon, 0) pair: the region's corner is at FPR 1 / (1 + e^eps), and its area is
    # e^eps / (1 + e^eps) (the triangle up to the corner plus the trapezoid after it).
    for eps in (0.5, 1.0, 3.0):
        corner = 1 / (1 + math.exp(eps))
        assert profile_tpr_bound(corner, ((eps, 0.0),)) == pytest.approx(math.exp(eps) * corner)
        assert profile_auc_bound(((eps, 0.0),)) == pytest.approx(math.exp(eps) * corner, abs=1e-6)
    assert dp_auc_bound(epsilon=1.0, delta=DELTA) == pytest.approx(0.731, abs=1e-3)
    assert dp_auc_bound(epsilon=8.0, delta=DELTA) > 0.999  # a single pair at epsilon 8 allows almost anything
    # The profile holds the learner's own epsilon at delta = 1e-5, and more pairs only tighten the region.
    history = (1.5, 0.05, 20)
    accountant = RDPAccountant()
    accountant.history = [history]
    profile = privacy_profile(noise_multiplier=history[0], sample_rate=history[1], steps=history[2])
    (at_delta,) = [pair for pair in profile if pair[1] == DELTA]
    assert at_delta[0] == pytest.approx(accountant.get_epsilon(delta=DELTA), rel=1e-9)
    assert profile_auc_bound(profile) < dp_auc_bound(epsilon=at_delta[0], delta=at_delta[1])
