"""Membership inference against the personalized and the central ``v``, without and with DP-SGD.

Threat model: an adversary with query access to a released ``v`` (a device's personalized model, or the
central ``v`` after FedAvg of 4 devices), who knows the training recipe and holds data from the same
distribution, guesses whether a candidate clip was trained on. Attacks: the loss attack and offline LiRA
with shadow models (:mod:`agent.attacks.membership`). Every candidate pool is split in half at random
(members / non-members).

Guarantee checked: with DP-SGD at ``(epsilon, delta)``, no attack's ROC AUC may exceed what
``(epsilon, delta)``-DP permits (:func:`agent.attacks.dp_auc_bound`) by more than three null standard
deviations of the AUC estimate. The same check must flag a model trained without DP (so it can fail).
"""

from __future__ import annotations

import math

import pytest

from agent.attacks import DPSpec, dp_auc_bound, dp_tpr_bound, membership_audit
from tests.privacy.conftest import NUM_CLASSES, Population

DELTA = 1e-5
EPOCHS = 20


def _slack(members: float, non_members: float) -> float:
    """Three standard deviations of the AUC estimate under the null (Mann-Whitney)."""
    return 3.0 * math.sqrt((1.0 / members + 1.0 / non_members) / 12.0)


def _run(population: Population, scenario: str, epsilon: float | None, full: bool) -> dict[str, float]:
    clips, labels = population.pool
    return membership_audit(
        clips,
        labels,
        num_classes=NUM_CLASSES,
        init=population.init,
        scenario=scenario,
        clients=4,
        shadows=8 if full else 3,
        epochs=EPOCHS,
        batch_size=8,
        dp=None if epsilon is None else DPSpec(target_epsilon=epsilon, delta=DELTA, max_grad_norm=1.0),
        seed=5,
    )


@pytest.mark.parametrize("scenario", ["personalized", "central"])
@pytest.mark.parametrize("epsilon", [8.0, 1.0])
def test_dp_bounds_membership_inference(
    population: Population, audit_report, audit_full: bool, scenario: str, epsilon: float
) -> None:
    """DP-SGD at epsilon 1 and 8: neither attack beats the DP hypothesis-testing bound."""
    figures = _run(population, scenario, epsilon, audit_full)
    bound = dp_auc_bound(epsilon=epsilon, delta=DELTA)
    slack = _slack(figures["members"], figures["non_members"])
    audit_report.record(
        f"membership_{scenario}_dp_eps{epsilon:g}",
        **figures,
        auc_bound=bound,
        auc_slack=slack,
        tpr_bound_at_1pct_fpr=dp_tpr_bound(0.01, epsilon=epsilon, delta=DELTA),
        delta=DELTA,
        epochs=EPOCHS,
    )
    assert figures["epsilon"] <= epsilon * 1.01
    assert figures["loss_auc"] <= bound + slack, figures
    assert figures["lira_auc"] <= bound + slack, figures


@pytest.mark.parametrize("scenario", ["personalized", "central"])
def test_without_dp_membership_leaks(
    population: Population, audit_report, audit_full: bool, scenario: str
) -> None:
    """Without DP the attacks work: the personalized model fails the epsilon = 1 check outright."""
    figures = _run(population, scenario, None, audit_full)
    bound = dp_auc_bound(epsilon=1.0, delta=DELTA)
    slack = _slack(figures["members"], figures["non_members"])
    audit_report.record(f"membership_{scenario}_no_dp", **figures, epochs=EPOCHS)
    assert max(figures["loss_auc"], figures["lira_auc"]) > 0.6, figures
    if scenario == "personalized":
        # The check that DP runs pass would reject this model: the audit has teeth.
        assert figures["loss_auc"] > bound + slack, figures
