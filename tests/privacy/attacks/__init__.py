"""Privacy attacks and audits run against fedfer's own models and protocol messages.

These are the adversary's tools, used by ``tests/privacy`` to measure leakage: update inversion against ``v``
(:mod:`tests.privacy.attacks.inversion`), membership inference (:mod:`tests.privacy.attacks.membership`) and
the one-run DP audit with canaries (:mod:`tests.privacy.attacks.canary_audit`). Nothing in the agent's data
path imports them.
"""

from tests.privacy.attacks.canary_audit import (
    CanaryAuditResult,
    dirac_canaries,
    empirical_epsilon,
    max_certifiable_epsilon,
    one_run_audit,
    one_run_p_value,
)
from tests.privacy.attacks.inversion import (
    GradientInversion,
    frame_similarity,
    label_overlap,
    mean_probabilities,
    rank_labels_by_row_norm,
    recover_label_counts,
    sgd_update,
    split_flat,
    update_to_gradient,
)
from tests.privacy.attacks.membership import (
    DPCheck,
    MembershipAudit,
    MembershipScores,
    check_against_profile,
    dp_auc_bound,
    dp_tpr_bound,
    lira_offline_scores,
    logit_confidence,
    loss_scores,
    membership_audit,
    privacy_profile,
    profile_auc_bound,
    profile_tpr_bound,
    roc_auc,
    roc_counts,
    tpr_at_fpr,
)
from tests.privacy.attacks.training import DPSpec, TrainedModel, poisson_rate, train_video_model

__all__ = [
    "CanaryAuditResult",
    "DPCheck",
    "DPSpec",
    "GradientInversion",
    "MembershipAudit",
    "MembershipScores",
    "TrainedModel",
    "check_against_profile",
    "dirac_canaries",
    "dp_auc_bound",
    "dp_tpr_bound",
    "empirical_epsilon",
    "frame_similarity",
    "label_overlap",
    "lira_offline_scores",
    "logit_confidence",
    "loss_scores",
    "max_certifiable_epsilon",
    "mean_probabilities",
    "membership_audit",
    "one_run_audit",
    "one_run_p_value",
    "poisson_rate",
    "privacy_profile",
    "profile_auc_bound",
    "profile_tpr_bound",
    "rank_labels_by_row_norm",
    "recover_label_counts",
    "roc_auc",
    "roc_counts",
    "sgd_update",
    "split_flat",
    "tpr_at_fpr",
    "train_video_model",
    "update_to_gradient",
]
