"""Unsupervised personalization of ``v`` on the device (Salman & Busso, ICMI 2022).

1. For each unlabelled clip, average IFER's per-frame probabilities: ``VFER^(x) = mean_i IFER(x_i)``.
2. Pseudo label = argmax of that mean; confidence = its value.
3. Per class keep at most ``P`` clips with the highest confidence, and drop any clip below ``p_threshold``.
4. Fine-tune only ``v`` on them with plain (unweighted) cross-entropy (lr 1e-3, 2 epochs by default),
   optionally with DP-SGD through Opacus (``DPLSTM`` inside ``v``; the result loads into the ordinary ``v``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from fedfer.agent.errors import DatasetError
from fedfer.agent.learning.dp import DPConfig, noise_for_target, rdp_epsilon
from fedfer.agent.learning.ledger import PrivacyBudget
from fedfer.agent.models.video import VideoModel, from_named_arrays, to_named_arrays
from fedfer.agent.records import FEATURE_DIM

__all__ = [
    "TRAINABLE",
    "PersonalizeConfig",
    "PersonalizeResult",
    "finetune_v",
    "pad_clips",
    "personalize",
    "predict_clips",
    "pseudo_labels",
    "select_clips",
    "trainable_names",
]


#: What :attr:`PersonalizeConfig.train` may name: a predicate on a parameter's name in ``v``.
TRAINABLE: dict[str, Callable[[str], bool]] = {
    "all": lambda name: True,
    "biases": lambda name: name.rsplit(".", 1)[-1].startswith("bias"),
}


def trainable_names(model: nn.Module, train: str) -> list[str]:
    """The names of ``model``'s parameters that personalization with ``train`` adapts."""
    keep = TRAINABLE[train]
    return [name for name, _ in model.named_parameters() if keep(name)]


@dataclass(frozen=True, slots=True, kw_only=True)
class PersonalizeConfig:
    """Personalization settings (defaults from the paper).

    Attributes:
        per_class: ``P``, the most clips kept per pseudo class.
        p_threshold: clips whose mean-probability confidence is below it are dropped.
        lr: Adam learning rate for ``v``.
        epochs: passes over the selected clips.
        batch_size: minibatch size (the expected batch size under DP's Poisson sampling).
        seed: torch seed for shuffling (not a secret; DP noise does not depend on it being secret).
        train: which of v's parameters adapt: ``all`` (the paper) or ``biases`` (only the bias vectors:
            the person's feature offset and class prior, 516 of ~206K parameters for K=6; see
            :data:`TRAINABLE`).
    """

    per_class: int = 50
    p_threshold: float = 0.5
    lr: float = 1e-3
    epochs: int = 2
    batch_size: int = 16
    seed: int = 0
    train: str = "all"

    def __post_init__(self) -> None:
        if type(self.per_class) is not int or self.per_class < 1:
            raise DatasetError("per_class must be a positive int")
        if not isinstance(self.p_threshold, int | float) or not 0.0 <= self.p_threshold <= 1.0:
            raise DatasetError("p_threshold must lie in [0, 1]")
        if not isinstance(self.lr, float) or not 0.0 < self.lr < 1.0:
            raise DatasetError("lr must be a float in (0, 1)")
        if type(self.epochs) is not int or self.epochs < 1:
            raise DatasetError("epochs must be a positive int")
        if type(self.batch_size) is not int or self.batch_size < 1:
            raise DatasetError("batch_size must be a positive int")
        if self.train not in TRAINABLE:
            raise DatasetError(f"train must be one of {sorted(TRAINABLE)}")


@dataclass(slots=True)
class PersonalizeResult:
    """Outcome of one personalization run."""

    selected: int = 0
    per_class: list[int] = field(default_factory=list)
    epsilon: float | None = None
    epsilon_total: float | None = None
    noise_multiplier: float | None = None
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)


def pseudo_labels(frame_probs: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per clip: argmax and max of the mean of IFER's per-frame probabilities ``(T_i, K)``.

    Raises:
        DatasetError: a clip has no frames or clips disagree on ``K``.
    """
    if not frame_probs:
        return np.zeros(0, np.int64), np.zeros(0, np.float64)
    k = np.asarray(frame_probs[0]).shape[-1]
    means = []
    for probs in frame_probs:
        p = np.asarray(probs, dtype=np.float64)
        if p.ndim != 2 or p.shape[0] == 0 or p.shape[1] != k:
            raise DatasetError("each clip needs a (frames, K) probability array with frames > 0")
        means.append(p.mean(axis=0))
    m = np.stack(means)
    return m.argmax(axis=1).astype(np.int64), m.max(axis=1)


def select_clips(
    labels: np.ndarray, confidence: np.ndarray, *, num_classes: int, per_class: int, p_threshold: float
) -> np.ndarray:
    """Indices (ascending) of the kept clips: per class the ``per_class`` most confident >= ``p_threshold``.

    Ties in confidence keep the earlier clip.
    """
    labels = np.asarray(labels)
    confidence = np.asarray(confidence, dtype=np.float64)
    if labels.shape != confidence.shape:
        raise DatasetError("labels and confidence must have the same shape")
    keep: list[int] = []
    for c in range(num_classes):
        idx = np.flatnonzero((labels == c) & (confidence >= p_threshold))
        order = idx[np.lexsort((idx, -confidence[idx]))]
        keep.extend(int(i) for i in order[:per_class])
    return np.array(sorted(keep), dtype=np.int64)


def pad_clips(clips: Sequence[np.ndarray], length: int | None = None) -> np.ndarray:
    """Stack clips ``(T_i, 1280)`` into ``(B, T, 1280)`` float32 with zero **pre**-padding.

    Clips longer than ``length`` keep their last ``length`` frames (v reads the last LSTM step).
    """
    if not clips:
        raise DatasetError("no clips to pad")
    for c in clips:
        if np.asarray(c).ndim != 2 or np.asarray(c).shape[1] != FEATURE_DIM or len(c) == 0:
            raise DatasetError("each clip must be a non-empty (frames, 1280) array")
    t = length if length is not None else max(len(c) for c in clips)
    out = np.zeros((len(clips), t, FEATURE_DIM), dtype=np.float32)
    for i, c in enumerate(clips):
        arr = np.asarray(c, dtype=np.float32)[-t:]
        out[i, t - len(arr) :] = arr
    return out


def predict_clips(model: nn.Module, clips: np.ndarray, *, batch_size: int = 128) -> np.ndarray:
    """Class probabilities ``(B, K)`` of ``v`` for padded clips ``(B, T, 1280)``."""
    model.eval()
    out = []
    with torch.inference_mode():
        for start in range(0, len(clips), batch_size):
            x = torch.from_numpy(np.asarray(clips[start : start + batch_size], dtype=np.float32))
            out.append(torch.softmax(model(x), dim=1).numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def _train_plain(
    model: VideoModel, x: torch.Tensor, y: torch.Tensor, config: PersonalizeConfig
) -> list[float]:
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=config.lr)
    loss_fn = nn.CrossEntropyLoss()
    losses = []
    model.train()
    for _ in range(config.epochs):
        order = torch.randperm(len(x))
        total = 0.0
        for start in range(0, len(x), config.batch_size):
            idx = order[start : start + config.batch_size]
            loss = loss_fn(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        losses.append(total / len(x))
    return losses


def _train_dp(
    model: VideoModel,
    x: torch.Tensor,
    y: torch.Tensor,
    config: PersonalizeConfig,
    dp: DPConfig,
    budget: PrivacyBudget | None,
    result: PersonalizeResult,
) -> list[float]:
    import warnings

    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    loader = DataLoader(TensorDataset(x, y), batch_size=config.batch_size, shuffle=True)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=config.lr)
    with warnings.catch_warnings():
        # Opacus warns that secure_mode is off; fedfer.agent.learning.dp documents that limitation.
        warnings.simplefilter("ignore", UserWarning)
        engine = PrivacyEngine(accountant="rdp", secure_mode=False)
        if dp.target_epsilon is not None:
            # make_private_with_epsilon's own calibration (sample rate 1 / batches), memoized.
            sigma = noise_for_target(float(dp.target_epsilon), dp.delta, 1.0 / len(loader), config.epochs)
        else:
            sigma = float(dp.noise_multiplier or 0.0)
        module, optimizer, dl = engine.make_private(
            module=model,
            optimizer=opt,
            data_loader=loader,
            noise_multiplier=sigma,
            max_grad_norm=float(dp.max_grad_norm),
        )
    steps_per_epoch = len(dl)
    planned = [(sigma, 1.0 / steps_per_epoch, config.epochs * steps_per_epoch)]
    if budget is not None:
        budget.check(planned)
    # Sum over the batch divided by its size equals the mean Opacus expects, and stays defined for the empty
    # batches Poisson sampling can draw: those still take a (noise-only) step, as the accountant assumes.
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    losses = []
    module.train()
    for _ in range(config.epochs):
        total, seen = 0.0, 0
        for xb, yb in dl:
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(module(xb), yb) / max(len(xb), 1)
            with warnings.catch_warnings():
                # The clips need no gradient; Opacus' hooks on the first layer say so on every step.
                warnings.simplefilter("ignore", UserWarning)
                loss.backward()
            optimizer.step()
            total += loss.item() * len(xb)
            seen += len(xb)
        losses.append(total / max(seen, 1))
    result.noise_multiplier = sigma
    history = [(float(s), float(q), int(n)) for s, q, n in engine.accountant.history]
    result.epsilon = rdp_epsilon(history, dp.delta)
    if budget is not None:
        result.epsilon_total = budget.record(history, note="personalize")
    else:
        result.epsilon_total = result.epsilon
    return losses


def finetune_v(
    v_arrays: Mapping[str, np.ndarray],
    clips: np.ndarray,
    labels: np.ndarray,
    *,
    num_classes: int,
    config: PersonalizeConfig,
    dp: DPConfig | None = None,
    budget: PrivacyBudget | None = None,
    result: PersonalizeResult | None = None,
) -> tuple[VideoModel, PersonalizeResult]:
    """Fine-tune a copy of ``v`` (given as named arrays) on padded clips with (pseudo) labels.

    Returns:
        The personalized ``v`` (an ordinary, non-DP :class:`VideoModel` whatever the training mode) and the
        run's report (epsilon when DP is on).

    Raises:
        PrivacyBudgetExceededError: DP is on and the budget cannot pay for this run (nothing is trained).
    """
    result = result if result is not None else PersonalizeResult()
    if len(clips) != len(labels) or len(clips) == 0:
        raise DatasetError("need at least one clip and one label per clip")
    torch.manual_seed(config.seed)
    t0 = time.perf_counter()
    x = torch.from_numpy(np.asarray(clips, dtype=np.float32))
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    model = VideoModel(num_classes=num_classes, dp=dp is not None)
    from_named_arrays(model, v_arrays)
    adapted = set(trainable_names(model, config.train))
    for name, param in model.named_parameters():
        param.requires_grad_(name in adapted)
    if dp is None:
        result.losses = _train_plain(model, x, y, config)
    else:
        if budget is not None:
            budget.check()
        result.losses = _train_dp(model, x, y, config, dp, budget, result)
    personal = VideoModel(num_classes=num_classes)
    from_named_arrays(personal, to_named_arrays(model))
    result.seconds = time.perf_counter() - t0
    return personal.eval(), result


def personalize(
    v_arrays: Mapping[str, np.ndarray],
    clip_features: Sequence[np.ndarray],
    clip_probs: Sequence[np.ndarray],
    *,
    num_classes: int,
    config: PersonalizeConfig | None = None,
    dp: DPConfig | None = None,
    budget: PrivacyBudget | None = None,
    length: int | None = None,
) -> tuple[VideoModel, PersonalizeResult]:
    """The whole device-side step: pseudo labels → selection → fine-tune ``v``.

    Args:
        v_arrays: the central ``v`` as named arrays.
        clip_features: per clip, f's features ``(T_i, 1280)``.
        clip_probs: per clip, IFER's probabilities ``(T_i, K)``.
        num_classes: K (IFER and v share the class set).
        config: personalization settings (paper defaults when omitted).
        dp: DP-SGD settings, or ``None`` for plain training.
        budget: the device's privacy budget (checked and charged when DP is on).
        length: pad/truncate clips to this many frames (default: the longest selected clip).

    Returns:
        The personalized ``v`` and the report; when no clip passes the threshold, ``v`` is returned
        unchanged and ``selected`` is 0.
    """
    config = config or PersonalizeConfig()
    if len(clip_features) != len(clip_probs):
        raise DatasetError("one probability array per clip is required")
    t0 = time.perf_counter()
    labels, conf = pseudo_labels(clip_probs)
    if labels.size and int(labels.max()) >= num_classes:
        raise DatasetError("IFER probabilities have more classes than v")
    keep = select_clips(
        labels, conf, num_classes=num_classes, per_class=config.per_class, p_threshold=config.p_threshold
    )
    result = PersonalizeResult(
        selected=len(keep), per_class=[int((labels[keep] == c).sum()) for c in range(num_classes)]
    )
    if len(keep) == 0:
        model = VideoModel(num_classes=num_classes)
        from_named_arrays(model, v_arrays)
        result.seconds = time.perf_counter() - t0
        return model.eval(), result
    clips = pad_clips([clip_features[i] for i in keep], length)
    model, result = finetune_v(
        v_arrays,
        clips,
        labels[keep],
        num_classes=num_classes,
        config=config,
        dp=dp,
        budget=budget,
        result=result,
    )
    result.seconds = time.perf_counter() - t0
    return model, result
