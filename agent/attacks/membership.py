"""Membership inference against ``v``: a loss attack and an offline likelihood-ratio attack (LiRA).

Threat model: an adversary with black-box query access to a released ``v`` (the personalized model on a
device, or the central ``v`` every device downloads), who knows the training recipe and has data from the same
distribution. It asks, for a candidate clip, whether that clip was in the training set.

* **Loss attack** (Yeom et al. 2018): score = minus the cross-entropy of the candidate under the model.
* **Offline LiRA** (Carlini et al. 2022): shadow models are trained by the same recipe on random halves of a
  data pool; for each candidate, the logit-scaled confidence ``phi = z_y - logsumexp_{k != y} z_k`` under the
  shadows that did *not* train on it fits a Gaussian (per-example mean, pooled variance); the score is the
  one-sided z-score of the target model's ``phi``.

Figures are the ROC AUC and the true-positive rate at 1% false-positive rate. :func:`dp_tpr_bound` and
:func:`dp_auc_bound` give what ``(epsilon, delta)``-DP permits any attack (the hypothesis-testing region of
Kairouz et al. 2015), against which DP-trained models are checked.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from security.errors import ValidationError

__all__ = [
    "MembershipScores",
    "dp_auc_bound",
    "dp_tpr_bound",
    "lira_offline_scores",
    "logit_confidence",
    "loss_scores",
    "membership_audit",
    "roc_auc",
    "tpr_at_fpr",
]


@dataclass(frozen=True)
class MembershipScores:
    """An attack's scores with the ground truth and its summary figures.

    Attributes:
        scores: higher means "member".
        is_member: the ground truth.
        auc: ROC AUC.
        tpr_at_1pct_fpr: TPR at FPR <= 1%.
    """

    scores: np.ndarray
    is_member: np.ndarray
    auc: float
    tpr_at_1pct_fpr: float

    @classmethod
    def of(cls, scores: np.ndarray, is_member: np.ndarray) -> MembershipScores:
        """Summarize ``scores`` against ``is_member``."""
        return cls(
            scores=np.asarray(scores, dtype=np.float64),
            is_member=np.asarray(is_member, dtype=bool),
            auc=roc_auc(scores, is_member),
            tpr_at_1pct_fpr=tpr_at_fpr(scores, is_member, fpr=0.01),
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
    s = np.asarray(scores, dtype=np.float64)
    m = np.asarray(is_member, dtype=bool)
    if s.shape != m.shape or m.all() or not m.any():
        raise ValidationError("need scores for both members and non-members")
    pos, neg = s[m], s[~m]
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (pos.size * neg.size))


def tpr_at_fpr(
    scores: Sequence[float] | np.ndarray, is_member: Sequence[bool] | np.ndarray, *, fpr: float = 0.01
) -> float:
    """The highest TPR over thresholds whose FPR is at most ``fpr`` (strictly above a non-member)."""
    s = np.asarray(scores, dtype=np.float64)
    m = np.asarray(is_member, dtype=bool)
    if s.shape != m.shape or m.all() or not m.any():
        raise ValidationError("need scores for both members and non-members")
    if not 0.0 <= fpr < 1.0:
        raise ValidationError("fpr must lie in [0, 1)")
    neg = np.sort(s[~m])[::-1]
    allowed = math.floor(fpr * neg.size)  # how many non-members may score above the threshold
    threshold = neg[allowed]  # predict member iff score > threshold
    return float((s[m] > threshold).mean())


def dp_tpr_bound(fpr: float, *, epsilon: float, delta: float) -> float:
    """The largest TPR any test can reach at ``fpr`` against an ``(epsilon, delta)``-DP mechanism."""
    if not 0.0 <= fpr <= 1.0 or epsilon < 0 or not 0.0 <= delta <= 1.0:
        raise ValidationError("fpr, delta must lie in [0, 1] and epsilon be >= 0")
    e = math.exp(epsilon)
    return float(min(1.0, e * fpr + delta, 1.0 - (1.0 - delta - fpr) / e))


def dp_auc_bound(*, epsilon: float, delta: float, grid: int = 20001) -> float:
    """The largest ROC AUC any membership test can reach against an ``(epsilon, delta)``-DP mechanism."""
    xs = np.linspace(0.0, 1.0, grid)
    ys = np.array([dp_tpr_bound(float(x), epsilon=epsilon, delta=delta) for x in xs])
    return float(np.sum((ys[1:] + ys[:-1]) * np.diff(xs)) / 2.0)


def _fedavg(models: Sequence[nn.Module]) -> dict[str, np.ndarray]:
    from agent.models import to_named_arrays

    arrays = [to_named_arrays(m) for m in models]
    return {k: np.mean([a[k] for a in arrays], axis=0).astype(np.float32) for k in arrays[0]}


def _train_scenario(
    clips: np.ndarray,
    labels: np.ndarray,
    members: np.ndarray,
    *,
    scenario: str,
    clients: int,
    seed: int,
    train_kwargs: dict[str, object],
) -> tuple[nn.Module, float | None]:
    """Train ``v`` on the clips flagged in ``members``: one device, or ``clients`` devices then FedAvg."""
    from agent.attacks.training import train_video_model
    from agent.models import VideoModel, from_named_arrays

    idx = np.flatnonzero(members)
    if scenario == "personalized":
        run = train_video_model(clips[idx], labels[idx], seed=seed, **train_kwargs)  # type: ignore[arg-type]
        return run.model, run.epsilon
    parts = np.array_split(idx, clients)
    runs = [
        train_video_model(clips[p], labels[p], seed=seed * 1000 + i, **train_kwargs)  # type: ignore[arg-type]
        for i, p in enumerate(parts)
    ]
    central = VideoModel(num_classes=int(train_kwargs["num_classes"]))  # type: ignore[call-overload]
    from_named_arrays(central, _fedavg([r.model for r in runs]))
    central.eval()
    # Each clip lives on one device only, so the central model inherits that device's guarantee.
    return central, runs[0].epsilon


def membership_audit(
    clips: np.ndarray,
    labels: np.ndarray,
    *,
    num_classes: int,
    init: dict[str, np.ndarray] | None,
    scenario: str = "personalized",
    clients: int = 4,
    shadows: int = 4,
    epochs: int = 30,
    lr: float = 1e-3,
    batch_size: int = 8,
    dp: object | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """Run the loss attack and offline LiRA against a ``v`` trained on a random half of ``clips``.

    The target trains on a random half of the pool (personalized: one device; central: ``clients`` devices
    each fine-tuning from ``init`` on its share, then FedAvg); ``shadows`` shadow models repeat the recipe on
    fresh random halves. Every clip of the pool is a candidate; members are the target's half.

    Args:
        clips: ``(N, T, 1280)`` candidate pool.
        labels: ``(N,)`` their labels.
        num_classes: ``K``.
        init: the central ``v`` training starts from (named arrays) or ``None`` for a fresh model.
        scenario: ``"personalized"`` or ``"central"``.
        clients: devices in the central scenario.
        shadows: shadow models for LiRA (>= 2).
        epochs: local epochs.
        lr: Adam learning rate.
        batch_size: local batch size.
        dp: a :class:`agent.attacks.training.DPSpec`, or ``None``.
        seed: seeds the splits and training.

    Returns:
        Figures: ``loss_auc``, ``loss_tpr_at_1pct_fpr``, ``lira_auc``, ``lira_tpr_at_1pct_fpr``, ``epsilon``
        (``nan`` without DP), ``train_accuracy``, ``test_accuracy``, ``members``, ``non_members``.
    """
    from agent.attacks.training import DPSpec

    if scenario not in ("personalized", "central"):
        raise ValidationError("scenario must be 'personalized' or 'central'")
    if dp is not None and not isinstance(dp, DPSpec):
        raise ValidationError("dp must be a DPSpec or None")
    if type(shadows) is not int or shadows < 2 or type(clients) is not int or clients < 1:
        raise ValidationError("shadows must be an int >= 2 and clients an int >= 1")
    n = len(clips)
    rng = np.random.default_rng(seed)

    def half() -> np.ndarray:
        mask = np.zeros(n, dtype=bool)
        mask[rng.permutation(n)[: n // 2]] = True
        return mask

    train_kwargs: dict[str, object] = {
        "num_classes": num_classes,
        "epochs": epochs,
        "lr": lr,
        "batch_size": batch_size,
        "init": init,
        "dp": dp,
    }
    if dp is not None and dp.target_epsilon is not None:
        # Calibrate the noise once (as Opacus would in each run) and reuse it for target and shadows.
        from opacus.accountants.utils import get_noise_multiplier

        per_device = n // 2 if scenario == "personalized" else math.ceil((n // 2) / clients)
        sigma = get_noise_multiplier(
            target_epsilon=dp.target_epsilon,
            target_delta=dp.delta,
            sample_rate=1.0 / math.ceil(per_device / min(batch_size, per_device)),
            epochs=epochs,
            accountant="rdp",
        )
        dp = DPSpec(noise_multiplier=float(sigma), delta=dp.delta, max_grad_norm=dp.max_grad_norm)
        train_kwargs["dp"] = dp
    members = half()
    target, epsilon = _train_scenario(
        clips, labels, members, scenario=scenario, clients=clients, seed=seed, train_kwargs=train_kwargs
    )
    shadow_in = np.stack([half() for _ in range(shadows)])
    shadow_phi = np.stack(
        [
            logit_confidence(
                _train_scenario(
                    clips,
                    labels,
                    m,
                    scenario=scenario,
                    clients=clients,
                    seed=seed + 1 + s,
                    train_kwargs=train_kwargs,
                )[0],
                clips,
                labels,
            )
            for s, m in enumerate(shadow_in)
        ]
    )
    loss = MembershipScores.of(loss_scores(target, clips, labels), members)
    lira = MembershipScores.of(
        lira_offline_scores(logit_confidence(target, clips, labels), shadow_phi, shadow_in), members
    )
    with torch.no_grad():
        predicted = _logits(target, clips).argmax(dim=1).numpy()
    correct = predicted == labels
    return {
        "loss_auc": loss.auc,
        "loss_tpr_at_1pct_fpr": loss.tpr_at_1pct_fpr,
        "lira_auc": lira.auc,
        "lira_tpr_at_1pct_fpr": lira.tpr_at_1pct_fpr,
        "epsilon": float("nan") if epsilon is None else float(epsilon),
        "train_accuracy": float(correct[members].mean()),
        "test_accuracy": float(correct[~members].mean()),
        "members": float(members.sum()),
        "non_members": float((~members).sum()),
    }
