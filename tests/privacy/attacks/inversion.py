"""Update inversion against ``v``: recover a client's labels and per-frame features from its model update.

Threat model: an honest-but-curious aggregator that knows the global ``v`` it sent, the clients' training
hyper-parameters (learning rate, batch size, clip length) and holds some public auxiliary features, and that
sees one client's *plain* update ``delta = v_after - v_before`` of one local SGD step (FedSGD). It wants the
clips' labels and the 1,280-d per-frame features the client trained on.

Two attacks, in the spirit of iDLG (Zhao et al. 2020), LLG (Wainakh et al. 2022) and Inverting Gradients
(Geiping et al. 2020):

* **Analytic label recovery** (:func:`recover_label_counts`). For softmax cross-entropy averaged over a batch
  of ``B`` clips, the gradient of the output bias is ``g_k = (1/B) sum_i (p_ik - y_ik)``, so the number of
  clips of class ``k`` is ``B * (mean_i p_ik - g_k)``. ``v``'s last layer reads the LSTM state, which can be
  negative, so iDLG's sign trick on the weight rows does not apply; the bias carries the counts instead, and
  the mean prediction is estimated on public probe clips. :func:`rank_labels_by_row_norm` is the weight-only
  variant (row norms of the last layer's gradient are largest for the classes present).
* **Optimization-based reconstruction** (:class:`GradientInversion`). Dummy non-negative features (post-ReLU
  pooled MobileNetV2 features are non-negative) are optimized with Adam so that the gradient they induce has
  maximal cosine similarity with the observed one, with an optional total-variation prior over time.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedfer.security.errors import ValidationError

__all__ = [
    "GradientInversion",
    "frame_similarity",
    "label_overlap",
    "mean_probabilities",
    "rank_labels_by_row_norm",
    "recover_label_counts",
    "sgd_update",
    "split_flat",
    "update_to_gradient",
]


def _params(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def sgd_update(
    model: nn.Module, clips: np.ndarray, labels: np.ndarray, *, lr: float
) -> dict[str, np.ndarray]:
    """The plain update one client would upload after one local SGD step (FedSGD): ``-lr * grad``.

    Args:
        model: the global ``v`` (not modified).
        clips: ``(B, T, 1280)`` float32 features.
        labels: ``(B,)`` integer labels.
        lr: the local learning rate (> 0).

    Returns:
        ``{parameter name: float32 delta}``.
    """
    if not isinstance(lr, int | float) or isinstance(lr, bool) or not lr > 0:
        raise ValidationError("lr must be a positive number")
    work = copy.deepcopy(model)
    params = _params(work)
    loss = F.cross_entropy(work(torch.from_numpy(clips)), torch.from_numpy(labels.astype(np.int64)))
    grads = torch.autograd.grad(loss, [p for _, p in params])
    return {n: (-lr * g).detach().numpy().astype(np.float32) for (n, _), g in zip(params, grads, strict=True)}


def update_to_gradient(update: Mapping[str, np.ndarray], *, lr: float) -> dict[str, np.ndarray]:
    """Invert :func:`sgd_update`: the gradient is ``-update / lr`` (the aggregator knows ``lr``)."""
    if not isinstance(lr, int | float) or isinstance(lr, bool) or not lr > 0:
        raise ValidationError("lr must be a positive number")
    return {n: (-np.asarray(u, dtype=np.float64) / lr).astype(np.float32) for n, u in update.items()}


def split_flat(vector: np.ndarray, model: nn.Module) -> dict[str, np.ndarray]:
    """Cut a flat vector into ``model``'s parameters (named-parameter order), e.g. to read an upload as ``v``.

    Raises:
        ValidationError: the vector's length is not the model's parameter count.
    """
    flat = np.asarray(vector, dtype=np.float64).ravel()
    params = _params(model)
    total = sum(p.numel() for _, p in params)
    if flat.size != total:
        raise ValidationError("vector length does not match the model's parameter count")
    out: dict[str, np.ndarray] = {}
    offset = 0
    for name, p in params:
        out[name] = flat[offset : offset + p.numel()].reshape(tuple(p.shape)).astype(np.float32)
        offset += p.numel()
    return out


def mean_probabilities(model: nn.Module, probe_clips: np.ndarray) -> np.ndarray:
    """The model's mean softmax output on public probe clips: the attacker's estimate of ``mean_i p_i``."""
    with torch.no_grad():
        probs = torch.softmax(model(torch.from_numpy(probe_clips)), dim=1)
    return probs.mean(dim=0).numpy().astype(np.float64)


def recover_label_counts(
    gradient: Mapping[str, np.ndarray],
    *,
    batch_size: int,
    num_classes: int,
    mean_probs: np.ndarray | None = None,
    bias_name: str = "out.bias",
) -> np.ndarray:
    """Analytic batch label recovery from the output-bias gradient.

    Args:
        gradient: the observed gradient by parameter name (must hold ``bias_name``).
        batch_size: ``B``, the number of clips in the client's batch.
        num_classes: ``K``.
        mean_probs: estimated mean softmax output over the batch (uniform if not given).
        bias_name: the output layer's bias.

    Returns:
        Integer counts ``(K,)`` summing to ``B``.

    Raises:
        ValidationError: missing/ill-shaped bias gradient or bad sizes.
    """
    if type(batch_size) is not int or batch_size < 1:
        raise ValidationError("batch_size must be a positive int")
    if type(num_classes) is not int or num_classes < 2:
        raise ValidationError("num_classes must be an int >= 2")
    if bias_name not in gradient or np.shape(gradient[bias_name]) != (num_classes,):
        raise ValidationError("gradient has no output bias of the right shape")
    g = np.asarray(gradient[bias_name], dtype=np.float64)
    p = np.full(num_classes, 1.0 / num_classes) if mean_probs is None else np.asarray(mean_probs, np.float64)
    if p.shape != (num_classes,):
        raise ValidationError("mean_probs must have shape (K,)")
    raw = batch_size * (p - g)
    raw = np.where(np.isfinite(raw), np.clip(raw, 0.0, None), 0.0)
    if raw.sum() <= 0:
        raw = np.ones(num_classes)
    raw = raw * (batch_size / raw.sum())
    counts: np.ndarray = np.floor(raw).astype(np.int64)
    remainder = raw - counts
    for k in np.argsort(-remainder, kind="stable")[: batch_size - int(counts.sum())]:
        counts[k] += 1
    return counts


def rank_labels_by_row_norm(
    gradient: Mapping[str, np.ndarray], *, weight_name: str = "out.weight"
) -> np.ndarray:
    """Classes ordered by the L2 norm of their row in the last layer's weight gradient (largest first).

    The weight-only fallback: a class present in the batch carries a ``(p - 1)`` factor, so its row is larger.
    """
    if weight_name not in gradient or np.ndim(gradient[weight_name]) != 2:
        raise ValidationError("gradient has no 2-d output weight")
    norms = np.linalg.norm(np.asarray(gradient[weight_name], dtype=np.float64), axis=1)
    order: np.ndarray = np.argsort(-norms, kind="stable")
    return order


def label_overlap(true_labels: np.ndarray, counts: np.ndarray) -> float:
    """Label accuracy of recovered counts: the fraction of the batch's labels matched as a multiset."""
    k = len(counts)
    true_counts = np.bincount(np.asarray(true_labels, dtype=np.int64), minlength=k)[:k]
    return float(np.minimum(true_counts, counts).sum() / max(1, len(true_labels)))


def frame_similarity(
    true_clips: np.ndarray, reconstructed: np.ndarray, *, center: np.ndarray | None = None
) -> float:
    """Mean over the true frames of the best cosine similarity with any reconstructed frame.

    Favourable to the attacker (each true frame is credited with its best match). With ``center`` (the
    population's mean feature), cosines are taken after subtracting it, so that the similarity every pair of
    non-negative features shares does not count as leakage.
    """
    t = np.asarray(true_clips, dtype=np.float64).reshape(-1, true_clips.shape[-1])
    r = np.asarray(reconstructed, dtype=np.float64).reshape(-1, reconstructed.shape[-1])
    if t.shape[1] != r.shape[1]:
        raise ValidationError("feature dimensions differ")
    if center is not None:
        t = t - center
        r = r - center
    tn = t / np.maximum(np.linalg.norm(t, axis=1, keepdims=True), 1e-12)
    rn = r / np.maximum(np.linalg.norm(r, axis=1, keepdims=True), 1e-12)
    return float(np.mean(np.max(tn @ rn.T, axis=1)))


class GradientInversion:
    """Reconstruct per-frame features from a gradient by cosine gradient matching (Inverting Gradients).

    Args:
        steps: Adam iterations (>= 1).
        lr: Adam learning rate (> 0); decayed x0.1 at 3/8, 5/8 and 7/8 of the steps.
        tv_weight: weight of the temporal total-variation prior (>= 0).
        nonnegative: project the dummy features onto ``>= 0`` after each step.
        init_scale: dummy features start uniform in ``[0, init_scale]``.
        seed: seeds the dummy initialization (attack randomness, not a secret).
    """

    def __init__(
        self,
        *,
        steps: int = 200,
        lr: float = 0.1,
        tv_weight: float = 0.0,
        nonnegative: bool = True,
        init_scale: float = 0.5,
        seed: int = 0,
    ) -> None:
        if type(steps) is not int or steps < 1:
            raise ValidationError("steps must be a positive int")
        for name, value in (("lr", lr), ("init_scale", init_scale)):
            if not isinstance(value, int | float) or isinstance(value, bool) or not value > 0:
                raise ValidationError(f"{name} must be a positive number")
        if not isinstance(tv_weight, int | float) or isinstance(tv_weight, bool) or not tv_weight >= 0:
            raise ValidationError("tv_weight must be a non-negative number")
        self.steps = steps
        self.lr = float(lr)
        self.tv_weight = float(tv_weight)
        self.nonnegative = bool(nonnegative)
        self.init_scale = float(init_scale)
        self.seed = int(seed)

    def __repr__(self) -> str:
        return f"GradientInversion(steps={self.steps}, lr={self.lr}, tv_weight={self.tv_weight})"

    def reconstruct(
        self,
        model: nn.Module,
        gradient: Mapping[str, np.ndarray],
        labels: Sequence[int] | np.ndarray,
        *,
        clip_len: int,
        feature_dim: int = 1280,
    ) -> np.ndarray:
        """Optimize dummy clips whose gradient matches ``gradient``.

        Args:
            model: the global ``v`` the gradient was taken at (not modified).
            gradient: observed gradient by parameter name (every trainable parameter of ``model``).
            labels: the labels to reconstruct with (e.g. expanded from :func:`recover_label_counts`).
            clip_len: frames per clip ``T``.
            feature_dim: features per frame.

        Returns:
            ``(B, T, feature_dim)`` float32 reconstructed features.
        """
        if type(clip_len) is not int or clip_len < 1:
            raise ValidationError("clip_len must be a positive int")
        y = torch.as_tensor(np.asarray(labels, dtype=np.int64))
        if y.ndim != 1 or len(y) == 0:
            raise ValidationError("labels must be a non-empty 1-d sequence")
        work = copy.deepcopy(model).eval()
        params = _params(work)
        if any(n not in gradient or np.shape(gradient[n]) != tuple(p.shape) for n, p in params):
            raise ValidationError("gradient does not cover the model's parameters")
        target = torch.cat([torch.from_numpy(np.asarray(gradient[n], np.float32)).ravel() for n, _ in params])
        target = torch.nan_to_num(target)
        target_norm = target.norm().clamp_min(1e-12)
        generator = torch.Generator().manual_seed(self.seed)
        x = (
            torch.rand((len(y), clip_len, feature_dim), generator=generator) * self.init_scale
        ).requires_grad_()
        optimizer = torch.optim.Adam([x], lr=self.lr)
        milestones = [math.floor(self.steps * f) for f in (3 / 8, 5 / 8, 7 / 8)]
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)
        weights = [p for _, p in params]
        for _ in range(self.steps):
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(work(x), y)
            grads = torch.autograd.grad(loss, weights, create_graph=True)
            flat = torch.cat([g.reshape(-1) for g in grads])
            cos = torch.dot(flat, target) / (flat.norm().clamp_min(1e-12) * target_norm)
            objective = 1.0 - cos
            if self.tv_weight > 0 and clip_len > 1:
                objective = objective + self.tv_weight * (x[:, 1:] - x[:, :-1]).abs().mean()
            (x_grad,) = torch.autograd.grad(objective, [x])
            x.grad = x_grad
            optimizer.step()
            scheduler.step()
            if self.nonnegative:
                with torch.no_grad():
                    x.clamp_(min=0.0)
        return x.detach().numpy().astype(np.float32)
