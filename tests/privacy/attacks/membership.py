"""Membership inference against ``v``: a loss attack and an offline likelihood-ratio attack (LiRA).

Threat model: an adversary with black-box query access to a released ``v`` (the personalized model on a
device, or the central ``v`` every device downloads), who knows the training recipe and has data from the same
distribution. It asks, for a candidate clip, whether that clip was in the training set.

* **Loss attack** (Yeom et al. 2018): score = minus the cross-entropy of the candidate under the model.
* **Offline LiRA** (Carlini et al. 2022): shadow models are trained by the same recipe on data that holds no
  candidate; for each candidate, the logit-scaled confidence ``phi = z_y - logsumexp_{k != y} z_k`` under
  those OUT shadows fits a Gaussian (per-example mean, pooled variance); the score is the one-sided z-score
  of the target model's ``phi``.

Figures are the ROC AUC and the true-positive rate at 1% false-positive rate. What DP permits any attack is
the hypothesis-testing region of Kairouz et al. (2015): a mechanism that is ``(epsilon, delta)``-DP confines
every test to ``TPR <= e^eps FPR + delta`` and ``1 - TPR >= e^-eps (1 - delta - FPR)``
(:func:`dp_tpr_bound`, :func:`dp_auc_bound`). DP-SGD's accountant certifies ``(epsilon(delta), delta)`` for
every delta at once (:func:`privacy_profile`); the intersection of those regions (:func:`profile_tpr_bound`,
:func:`profile_auc_bound`) is what :func:`check_against_profile` holds measured figures to, with exact
binomial confidence bounds.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedfer.security.errors import ValidationError
from tests.privacy.attacks.training import DPSpec, TrainedModel, check_clips, poisson_rate, train_video_model

__all__ = [
    "DPCheck",
    "MembershipAudit",
    "MembershipScores",
    "check_against_profile",
    "dp_auc_bound",
    "dp_tpr_bound",
    "lira_offline_scores",
    "logit_confidence",
    "loss_scores",
    "membership_audit",
    "privacy_profile",
    "profile_auc_bound",
    "profile_tpr_bound",
    "roc_auc",
    "roc_counts",
    "tpr_at_fpr",
]


@dataclass(frozen=True)
class MembershipScores:
    """An attack's scores with the ground truth and its summary figures.

    Attributes:
        scores: higher means "member".
        is_member: the ground truth.
        auc: ROC AUC.
        tpr_at_1pct_fpr: TPR at the lowest threshold whose FPR is at most 1%.
        true_positives: members above that threshold.
        false_positives: non-members above it (at most 1% of them).
    """

    scores: np.ndarray
    is_member: np.ndarray
    auc: float
    tpr_at_1pct_fpr: float
    true_positives: int
    false_positives: int

    @classmethod
    def of(cls, scores: np.ndarray, is_member: np.ndarray) -> MembershipScores:
        """Summarize ``scores`` against ``is_member``."""
        tp, fp = roc_counts(scores, is_member, fpr=0.01)
        members = np.asarray(is_member, dtype=bool)
        return cls(
            scores=np.asarray(scores, dtype=np.float64),
            is_member=members,
            auc=roc_auc(scores, is_member),
            tpr_at_1pct_fpr=tp / int(members.sum()),
            true_positives=tp,
            false_positives=fp,
        )


def _logits(model: nn.Module, clips: np.ndarray) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        logits: torch.Tensor = model(torch.from_numpy(np.asarray(clips, dtype=np.float32)))
    return logits.double()


def loss_scores(model: nn.Module, clips: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Loss-attack scores: minus the per-clip cross-entropy (members have lower loss)."""
    logits = _logits(model, clips)
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    return (-F.cross_entropy(logits, y, reduction="none")).numpy()


def logit_confidence(model: nn.Module, clips: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """LiRA's logit-scaled confidence ``log(p_y / (1 - p_y))``, computed stably from the logits."""
    logits = _logits(model, clips)
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    correct = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.scatter(1, y[:, None], float("-inf"))
    return (correct - torch.logsumexp(others, dim=1)).numpy()


def lira_offline_scores(
    target_phi: np.ndarray, shadow_phi: np.ndarray, shadow_in: np.ndarray, *, min_out: int = 1
) -> np.ndarray:
    """Offline LiRA: z-score of the target's confidence against the OUT shadows' Gaussian, per candidate.

    Args:
        target_phi: ``(N,)`` confidences under the target model.
        shadow_phi: ``(S, N)`` confidences under ``S`` shadow models.
        shadow_in: ``(S, N)`` booleans, ``True`` where the shadow trained on the candidate.
        min_out: candidates need at least this many OUT shadows (others fall back to the pooled OUT mean).

    Returns:
        ``(N,)`` scores, higher means "member".
    """
    target_phi = np.asarray(target_phi, dtype=np.float64)
    shadow_phi = np.asarray(shadow_phi, dtype=np.float64)
    shadow_in = np.asarray(shadow_in, dtype=bool)
    if shadow_phi.ndim != 2 or shadow_phi.shape != shadow_in.shape or shadow_phi.shape[1] != target_phi.size:
        raise ValidationError("shadow arrays must be (S, N) matching the N candidates")
    out = ~shadow_in
    if not out.any():
        raise ValidationError("no OUT shadow observations")
    n_out = out.sum(axis=0)
    pooled_mean = float(shadow_phi[out].mean())
    mean = np.where(n_out >= min_out, (shadow_phi * out).sum(axis=0) / np.maximum(n_out, 1), pooled_mean)
    residuals = (shadow_phi - mean)[out]
    # A pooled ("global") variance: Carlini et al. find it better than per-example variances with few shadows.
    std = float(np.sqrt(np.mean(residuals**2))) if residuals.size > 1 else 1.0
    return (target_phi - mean) / max(std, 1e-6)


def roc_auc(scores: Sequence[float] | np.ndarray, is_member: Sequence[bool] | np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney statistic, ties counted half).

    Raises:
        ValidationError: lengths differ or one class is empty.
    """
    s, m = _check_scores(scores, is_member)
    pos, neg = s[m], s[~m]
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (pos.size * neg.size))


def _check_scores(
    scores: Sequence[float] | np.ndarray, is_member: Sequence[bool] | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64)
    m = np.asarray(is_member, dtype=bool)
    if s.shape != m.shape or m.all() or not m.any():
        raise ValidationError("need scores for both members and non-members")
    return s, m


def roc_counts(
    scores: Sequence[float] | np.ndarray, is_member: Sequence[bool] | np.ndarray, *, fpr: float = 0.01
) -> tuple[int, int]:
    """``(true positives, false positives)`` at the lowest threshold whose FPR is at most ``fpr``.

    "Member" means strictly above the threshold; the threshold is a non-member's score, chosen so that at
    most ``floor(fpr * non-members)`` non-members lie above it. With fewer than ``1 / fpr`` non-members that
    is zero false positives: the figure is then really the TPR at FPR 0.
    """
    s, m = _check_scores(scores, is_member)
    if not 0.0 <= fpr < 1.0:
        raise ValidationError("fpr must lie in [0, 1)")
    neg = np.sort(s[~m])[::-1]
    threshold = neg[math.floor(fpr * neg.size)]
    return int((s[m] > threshold).sum()), int((s[~m] > threshold).sum())


def tpr_at_fpr(
    scores: Sequence[float] | np.ndarray, is_member: Sequence[bool] | np.ndarray, *, fpr: float = 0.01
) -> float:
    """The highest TPR over thresholds whose FPR is at most ``fpr`` (see :func:`roc_counts`)."""
    tp, _ = roc_counts(scores, is_member, fpr=fpr)
    return tp / int(np.asarray(is_member, dtype=bool).sum())


def dp_tpr_bound(fpr: float, *, epsilon: float, delta: float) -> float:
    """The largest TPR any test can reach at ``fpr`` against an ``(epsilon, delta)``-DP mechanism."""
    return profile_tpr_bound(fpr, ((epsilon, delta),))


def dp_auc_bound(*, epsilon: float, delta: float) -> float:
    """The largest ROC AUC any membership test can reach against an ``(epsilon, delta)``-DP mechanism."""
    return profile_auc_bound(((epsilon, delta),))


def _check_profile(profile: Sequence[tuple[float, float]]) -> np.ndarray:
    pairs = np.asarray(profile, dtype=np.float64).reshape(-1, 2)
    if pairs.size == 0 or not np.all(np.isfinite(pairs)):
        raise ValidationError("a privacy profile needs finite (epsilon, delta) pairs")
    if np.any(pairs[:, 0] < 0) or np.any(pairs[:, 1] < 0) or np.any(pairs[:, 1] > 1):
        raise ValidationError("epsilon must be >= 0 and delta in [0, 1]")
    return pairs


def _tradeoff(fpr: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """``min`` over the pairs of ``min(1, e^eps fpr + delta, 1 - e^-eps (1 - delta - fpr))``, elementwise."""
    eps, delta = pairs[:, 0][:, None], pairs[:, 1][:, None]
    x = fpr[None, :]
    bound = np.minimum(np.exp(eps) * x + delta, 1.0 - np.exp(-eps) * (1.0 - delta - x))
    out: np.ndarray = np.clip(bound.min(axis=0), 0.0, 1.0)
    return out


def profile_tpr_bound(fpr: float, profile: Sequence[tuple[float, float]]) -> float:
    """The largest TPR at ``fpr`` against a mechanism that is ``(epsilon_i, delta_i)``-DP for every pair.

    Each pair confines the ROC curve of every test to ``TPR <= e^eps FPR + delta`` and
    ``1 - TPR >= e^-eps (1 - delta - FPR)`` (Kairouz et al. 2015); a mechanism satisfying all the pairs lies
    under their minimum.

    Raises:
        ValidationError: ``fpr`` outside ``[0, 1]`` or a malformed profile.
    """
    if not 0.0 <= fpr <= 1.0:
        raise ValidationError("fpr must lie in [0, 1]")
    return float(_tradeoff(np.array([float(fpr)]), _check_profile(profile))[0])


def profile_auc_bound(profile: Sequence[tuple[float, float]], *, grid: int = 20001) -> float:
    """The largest ROC AUC any test can reach against a mechanism satisfying every pair of ``profile``.

    Every attack's ROC curve lies under :func:`profile_tpr_bound` (a concave curve), so its area does too.
    For the single pair ``(1, 1e-5)`` this is 0.731 and for ``(8, 1e-5)`` 0.9997: one pair at epsilon 8 allows
    almost anything. DP-SGD's accountant certifies a whole curve ``epsilon(delta)``
    (:func:`privacy_profile`), whose intersection is far tighter.
    """
    pairs = _check_profile(profile)
    xs = np.linspace(0.0, 1.0, grid)
    ys = _tradeoff(xs, pairs)
    return float(np.sum((ys[1:] + ys[:-1]) * np.diff(xs)) / 2.0)


PROFILE_DELTAS: tuple[float, ...] = tuple(
    sorted({*(float(d) for d in np.logspace(-12, math.log10(0.5), 60)), 1e-5})
)
"""Where :func:`privacy_profile` evaluates the accountant: 1e-12 to 0.5 log-spaced, and 1e-5."""


def privacy_profile(
    *,
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    deltas: Sequence[float] = PROFILE_DELTAS,
) -> tuple[tuple[float, float], ...]:
    """The ``(epsilon(delta), delta)`` pairs Opacus' RDP accountant certifies for a DP-SGD run.

    ``steps`` steps of the Poisson-subsampled Gaussian mechanism with noise multiplier ``noise_multiplier``
    and sampling rate ``sample_rate`` are ``(epsilon(delta), delta)``-DP for *every* delta at once; each pair
    below is one such statement (the same conversion the learner uses to report its epsilon).

    Raises:
        ValidationError: a non-positive noise multiplier, a rate outside ``(0, 1]`` or no steps.
    """
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    if not noise_multiplier > 0 or not 0.0 < sample_rate <= 1.0 or type(steps) is not int or steps < 1:
        raise ValidationError("need a positive noise multiplier, a rate in (0, 1] and steps >= 1")
    orders = list(RDPAccountant.DEFAULT_ALPHAS)
    rdp = compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=steps, orders=orders)
    # The conversion can return a negative epsilon at large delta; (0, delta) is then the statement. At the
    # extreme deltas Opacus warns that the best order is the largest one: such a pair is loose, not wrong.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return tuple(
            (max(0.0, float(get_privacy_spent(orders=orders, rdp=rdp, delta=float(d))[0])), float(d))
            for d in deltas
        )


def _fedavg(models: Sequence[nn.Module]) -> dict[str, np.ndarray]:
    from fedfer.agent.models.video import to_named_arrays

    arrays = [to_named_arrays(m) for m in models]
    return {k: np.mean([a[k] for a in arrays], axis=0).astype(np.float32) for k in arrays[0]}


@dataclass(frozen=True)
class DPCheck:
    """Whether an attack's figures are consistent with a privacy profile, at confidence ``1 - alpha`` each.

    The TPR and FPR of the attack's 1%-FPR threshold are binomial proportions over candidates: the check
    takes a Clopper-Pearson lower bound on the TPR and upper bound on the FPR, and the profile's largest TPR
    at that FPR. The AUC estimate's variance is at most ``A (1 - A) / min(members, non-members)`` whatever
    the score distributions (Birnbaum & Klose 1957), so its slack is ``z_alpha`` times that standard
    deviation at the largest AUC the profile allows.

    Attributes:
        alpha: one-sided error level of each bound.
        tpr_lower: lower confidence bound on the TPR.
        fpr_upper: upper confidence bound on the FPR.
        tpr_allowed: the profile's largest TPR at ``fpr_upper``.
        auc: the measured AUC.
        auc_allowed: the profile's largest AUC.
        auc_slack: the confidence slack added to ``auc_allowed``.
    """

    alpha: float
    tpr_lower: float
    fpr_upper: float
    tpr_allowed: float
    auc: float
    auc_allowed: float
    auc_slack: float

    @property
    def tpr_violated(self) -> bool:
        """The attack's TPR at 1% FPR is significantly above what the profile allows."""
        return self.tpr_lower > self.tpr_allowed

    @property
    def auc_violated(self) -> bool:
        """The attack's AUC is significantly above what the profile allows."""
        return self.auc > self.auc_allowed + self.auc_slack

    def as_dict(self) -> dict[str, float | bool]:
        """The figures, with both verdicts, for the audit report."""
        return {**self.__dict__, "tpr_violated": self.tpr_violated, "auc_violated": self.auc_violated}


def check_against_profile(
    attack: MembershipScores, profile: Sequence[tuple[float, float]], *, alpha: float = 1e-3
) -> DPCheck:
    """Compare an attack's AUC and TPR at 1% FPR with what ``profile`` permits (see :class:`DPCheck`)."""
    from statistics import NormalDist

    from tests.privacy.attacks._stats import clopper_pearson

    members = int(attack.is_member.sum())
    non_members = int((~attack.is_member).sum())
    tpr_lower, _ = clopper_pearson(attack.true_positives, members, alpha=alpha)
    _, fpr_upper = clopper_pearson(attack.false_positives, non_members, alpha=alpha)
    auc_allowed = profile_auc_bound(profile)
    spread = max(auc_allowed, 0.5)
    slack = NormalDist().inv_cdf(1.0 - alpha) * math.sqrt(spread * (1.0 - spread) / min(members, non_members))
    return DPCheck(
        alpha=alpha,
        tpr_lower=tpr_lower,
        fpr_upper=fpr_upper,
        tpr_allowed=profile_tpr_bound(fpr_upper, profile),
        auc=attack.auc,
        auc_allowed=auc_allowed,
        auc_slack=slack,
    )


@dataclass(frozen=True)
class MembershipAudit:
    """The outcome of :func:`membership_audit`.

    Attributes:
        loss: the loss attack's scores and figures.
        lira: offline LiRA's.
        target_run: the training run of the target (of device 0 in the central scenario): its privacy
            accounting, from which :func:`privacy_profile` rebuilds what the accountant certifies.
        train_accuracy: the target's accuracy on its members.
        test_accuracy: its accuracy on the non-members.
        init_test_accuracy: the starting model's accuracy on the non-members (``nan`` without one).
        shadows: shadow models trained.
    """

    loss: MembershipScores
    lira: MembershipScores
    target_run: TrainedModel
    train_accuracy: float
    test_accuracy: float
    init_test_accuracy: float
    shadows: int

    def profile(self) -> tuple[tuple[float, float], ...]:
        """What the accountant certifies for the target (per device), or raise for a run without noise.

        Raises:
            ValidationError: the target was trained without DP.
        """
        run = self.target_run
        if run.noise_multiplier is None or run.sample_rate is None or not run.noise_multiplier > 0:
            raise ValidationError("the target was trained without DP: no privacy profile")
        return privacy_profile(
            noise_multiplier=run.noise_multiplier, sample_rate=run.sample_rate, steps=run.steps
        )

    def figures(self) -> dict[str, float]:
        """Flat figures for the audit report."""
        run = self.target_run
        out = {
            "members": float(self.loss.is_member.sum()),
            "non_members": float((~self.loss.is_member).sum()),
            "shadows": float(self.shadows),
            "train_accuracy": self.train_accuracy,
            "test_accuracy": self.test_accuracy,
            "init_test_accuracy": self.init_test_accuracy,
            "epsilon": float("nan") if run.epsilon is None else float(run.epsilon),
            "noise_multiplier": float("nan") if run.noise_multiplier is None else run.noise_multiplier,
            "sample_rate": float("nan") if run.sample_rate is None else run.sample_rate,
            "steps": float(run.steps),
        }
        for name, attack in (("loss", self.loss), ("lira", self.lira)):
            out[f"{name}_auc"] = attack.auc
            out[f"{name}_tpr_at_1pct_fpr"] = attack.tpr_at_1pct_fpr
            out[f"{name}_true_positives"] = float(attack.true_positives)
            out[f"{name}_false_positives"] = float(attack.false_positives)
        return out


Data = tuple[np.ndarray, np.ndarray]


def _train_scenario(
    data: Data, *, scenario: str, clients: int, seed: int, train_kwargs: dict[str, Any]
) -> tuple[nn.Module, TrainedModel]:
    """Train ``v`` on ``data``: one device, or ``clients`` devices on equal shares then FedAvg."""
    from fedfer.agent.models.video import VideoModel, from_named_arrays

    clips, labels = data
    if scenario == "personalized":
        run = train_video_model(clips, labels, seed=seed, **train_kwargs)
        return run.model, run
    parts = np.array_split(np.arange(len(clips)), clients)
    runs = [
        train_video_model(clips[p], labels[p], seed=seed * 1000 + i, **train_kwargs)
        for i, p in enumerate(parts)
    ]
    central = VideoModel(num_classes=int(train_kwargs["num_classes"]))
    from_named_arrays(central, _fedavg([r.model for r in runs]))
    central.eval()
    # Each clip lives on one device only, so the central model inherits that device's guarantee.
    return central, runs[0]


def _accuracy(model: nn.Module, data: Data) -> float:
    predicted = _logits(model, data[0]).argmax(dim=1).numpy()
    return float((predicted == data[1]).mean())


def membership_audit(
    members: Data,
    non_members: Data,
    shadow_sets: Sequence[Data],
    *,
    num_classes: int,
    init: Mapping[str, np.ndarray] | None,
    scenario: str = "personalized",
    clients: int = 4,
    epochs: int = 1,
    lr: float = 1e-3,
    batch_size: int = 8,
    dp: DPSpec | None = None,
    seed: int = 0,
) -> MembershipAudit:
    """Train a target ``v`` on ``members`` and run the loss attack and offline LiRA against it.

    The candidates are ``members`` (the target's whole training set) and ``non_members`` (drawn from the
    same distribution, never trained on). The target is one device fine-tuning from ``init``
    (``"personalized"``) or ``clients`` devices fine-tuning on equal shares, then FedAvg (``"central"``).
    Each shadow model repeats that recipe on its own set in ``shadow_sets``, which must hold no candidate:
    every shadow is then an OUT model for every candidate, so offline LiRA gets ``len(shadow_sets)`` OUT
    observations per candidate.

    Args:
        members: ``(clips (N, T, 1280), labels (N,))`` the target trains on.
        non_members: candidates it never sees.
        shadow_sets: one training set per shadow model (>= 1), disjoint from the candidates.
        num_classes: ``K``.
        init: the central ``v`` training starts from (named arrays), or ``None`` for a fresh model.
        scenario: ``"personalized"`` or ``"central"``.
        clients: devices in the central scenario.
        epochs: local epochs.
        lr: Adam learning rate.
        batch_size: local (expected) batch size.
        dp: DP-SGD configuration (a ``target_epsilon`` is calibrated to a noise multiplier once, for the
            per-device data size, and used by target and shadows alike), or ``None``.
        seed: seeds training.

    Returns:
        Both attacks' scores, the target's accounting and its accuracy.

    Raises:
        ValidationError: bad arguments or malformed data.
    """
    if scenario not in ("personalized", "central"):
        raise ValidationError("scenario must be 'personalized' or 'central'")
    if dp is not None and not isinstance(dp, DPSpec):
        raise ValidationError("dp must be a DPSpec or None")
    if type(clients) is not int or clients < 1 or not shadow_sets:
        raise ValidationError("clients must be an int >= 1 and at least one shadow set is needed")
    for clips, labels in (members, non_members, *shadow_sets):
        check_clips(clips, labels, num_classes=num_classes)
    per_device = len(members[0]) if scenario == "personalized" else len(members[0]) // clients
    if dp is not None and dp.target_epsilon is not None:
        from opacus.accountants.utils import get_noise_multiplier

        sigma = get_noise_multiplier(
            target_epsilon=dp.target_epsilon,
            target_delta=dp.delta,
            sample_rate=poisson_rate(per_device, batch_size),
            epochs=epochs,
            accountant="rdp",
        )
        dp = DPSpec(noise_multiplier=float(sigma), delta=dp.delta, max_grad_norm=dp.max_grad_norm)
    train_kwargs: dict[str, Any] = {
        "num_classes": num_classes,
        "epochs": epochs,
        "lr": lr,
        "batch_size": batch_size,
        "init": init,
        "dp": dp,
    }
    target, run = _train_scenario(
        members, scenario=scenario, clients=clients, seed=seed, train_kwargs=train_kwargs
    )
    clips = np.concatenate([members[0], non_members[0]])
    labels = np.concatenate([members[1], non_members[1]])
    is_member = np.arange(len(clips)) < len(members[0])
    shadow_phi = np.stack(
        [
            logit_confidence(
                _train_scenario(
                    data, scenario=scenario, clients=clients, seed=seed + 1 + s, train_kwargs=train_kwargs
                )[0],
                clips,
                labels,
            )
            for s, data in enumerate(shadow_sets)
        ]
    )
    lira_scores = lira_offline_scores(
        logit_confidence(target, clips, labels), shadow_phi, np.zeros_like(shadow_phi, dtype=bool)
    )
    init_accuracy = float("nan")
    if init is not None:
        from fedfer.agent.models.video import VideoModel, from_named_arrays

        start = VideoModel(num_classes=num_classes)
        from_named_arrays(start, init)
        init_accuracy = _accuracy(start, non_members)
    return MembershipAudit(
        loss=MembershipScores.of(loss_scores(target, clips, labels), is_member),
        lira=MembershipScores.of(lira_scores, is_member),
        target_run=run,
        train_accuracy=_accuracy(target, members),
        test_accuracy=_accuracy(target, non_members),
        init_test_accuracy=init_accuracy,
        shadows=len(shadow_sets),
    )
