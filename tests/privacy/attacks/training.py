"""Train ``v`` the way a device does, with or without DP-SGD, for attacks that need target and shadow models.

Membership inference and the canary audit need many small, reproducible training runs of the video model ``v``
(:class:`fedfer.agent.models.video.VideoModel`): the target, a handful of shadow models, and one run with
canaries. :func:`train_video_model` runs, by default, the device's own fine-tuning code
(:func:`fedfer.agent.learning.personalize.finetune_v`, plain Adam or its Opacus DP-SGD), so the audits measure
the shipped learner. ``engine="opacus"`` is this module's own Opacus loop (per-sample clipping + Gaussian
noise, ``DPLSTM`` via ``VideoModel(dp=True)``, Poisson sampling, RDP accountant): it also accepts
configurations the learner rightly refuses, such as a noise multiplier of 0, which the canary audit needs for
its deliberately broken runs.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedfer.agent.models.video import VideoModel, from_named_arrays, to_named_arrays
from fedfer.security.errors import ValidationError

__all__ = ["DPSpec", "TrainedModel", "check_clips", "poisson_rate", "train_video_model"]


class DPSpec:
    """How DP-SGD is configured for one training run.

    Give either ``target_epsilon`` (the noise multiplier is then calibrated by Opacus for the run's sampling
    rate and number of epochs) or ``noise_multiplier``. The Gaussian noise added to each summed batch gradient
    has standard deviation ``noise_multiplier * max_grad_norm``.

    Args:
        max_grad_norm: per-sample clipping bound ``C`` (> 0).
        delta: the target ``delta`` of ``(epsilon, delta)``-DP, in ``(0, 1)``.
        target_epsilon: calibrate the noise to reach this epsilon (> 0).
        noise_multiplier: use this noise multiplier directly (>= 0; 0 means *no noise*, only for audits).
    """

    def __init__(
        self,
        *,
        max_grad_norm: float = 1.0,
        delta: float = 1e-5,
        target_epsilon: float | None = None,
        noise_multiplier: float | None = None,
    ) -> None:
        if not _is_real(max_grad_norm) or max_grad_norm <= 0:
            raise ValidationError("max_grad_norm must be a positive number")
        if not _is_real(delta) or not 0.0 < delta < 1.0:
            raise ValidationError("delta must lie in (0, 1)")
        if (target_epsilon is None) == (noise_multiplier is None):
            raise ValidationError("give exactly one of target_epsilon and noise_multiplier")
        if target_epsilon is not None and (not _is_real(target_epsilon) or target_epsilon <= 0):
            raise ValidationError("target_epsilon must be a positive number")
        if noise_multiplier is not None and (not _is_real(noise_multiplier) or noise_multiplier < 0):
            raise ValidationError("noise_multiplier must be a non-negative number")
        self.max_grad_norm = float(max_grad_norm)
        self.delta = float(delta)
        self.target_epsilon = None if target_epsilon is None else float(target_epsilon)
        self.noise_multiplier = None if noise_multiplier is None else float(noise_multiplier)

    def __repr__(self) -> str:
        return (
            f"DPSpec(max_grad_norm={self.max_grad_norm}, delta={self.delta}, "
            f"target_epsilon={self.target_epsilon}, noise_multiplier={self.noise_multiplier})"
        )


@dataclass(frozen=True)
class TrainedModel:
    """The result of :func:`train_video_model`.

    Attributes:
        model: the trained ``v`` in eval mode (a plain :class:`VideoModel`, even after DP training).
        epsilon: the accountant's epsilon at ``delta`` for a DP run, else ``None``.
        noise_multiplier: the noise multiplier used (``None`` without DP).
        sample_rate: the Poisson sampling rate of a DP run (``None`` without DP).
        steps: optimizer steps taken.
    """

    model: VideoModel
    epsilon: float | None
    noise_multiplier: float | None
    sample_rate: float | None
    steps: int


def _is_real(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(float(value))


def poisson_rate(n: int, batch_size: int) -> float:
    """Opacus' Poisson sampling rate for ``n`` examples at expected batch ``batch_size``: ``1 / ceil(n / b)``.

    (Opacus' ``DPDataLoader`` takes one over the length of the plain loader it replaces.)
    """
    if type(n) is not int or type(batch_size) is not int or n < 1 or batch_size < 1:
        raise ValidationError("n and batch_size must be positive ints")
    return 1.0 / math.ceil(n / min(batch_size, n))


def check_clips(clips: np.ndarray, labels: np.ndarray, *, num_classes: int) -> None:
    """Validate a batch of clips ``(N, T, 1280)`` float32 and integer labels ``(N,)`` in ``[0, K)``.

    Raises:
        ValidationError: wrong shapes, dtypes, non-finite values or labels out of range.
    """
    if not isinstance(clips, np.ndarray) or clips.ndim != 3 or clips.shape[2] != 1280:
        raise ValidationError("clips must be an array of shape (N, T, 1280)")
    if clips.dtype != np.float32 or not np.all(np.isfinite(clips)):
        raise ValidationError("clips must be finite float32")
    if (
        not isinstance(labels, np.ndarray)
        or labels.shape != (clips.shape[0],)
        or labels.dtype.kind not in "iu"
    ):
        raise ValidationError("labels must be an integer array of shape (N,)")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValidationError("labels out of range")


def train_video_model(
    clips: np.ndarray,
    labels: np.ndarray,
    *,
    num_classes: int,
    epochs: int,
    lr: float = 1e-3,
    batch_size: int = 8,
    init: Mapping[str, np.ndarray] | None = None,
    dp: DPSpec | None = None,
    seed: int = 0,
    engine: str = "learner",
) -> TrainedModel:
    """Fine-tune (or train) ``v`` on ``clips`` with unweighted cross-entropy and Adam.

    Args:
        clips: ``(N, T, 1280)`` float32 per-frame features.
        labels: ``(N,)`` integer labels (pseudo labels on a device).
        num_classes: ``K``.
        epochs: passes over the data (>= 1).
        lr: Adam learning rate.
        batch_size: (expected) batch size; with DP the sampling rate is ``batch_size / N``.
        init: named arrays to start from (the central ``v``); a fresh seeded model otherwise.
        dp: DP-SGD configuration, or ``None`` for plain training.
        seed: seeds initialization, shuffling and (non-secret, simulation-only) DP noise.
        engine: ``"learner"`` (the device's fine-tuning code) or ``"opacus"`` (this module's loop).

    Returns:
        The trained model with its privacy accounting.

    Raises:
        ValidationError: malformed data or arguments.
    """
    check_clips(clips, labels, num_classes=num_classes)
    if type(epochs) is not int or epochs < 1:
        raise ValidationError("epochs must be a positive int")
    if type(batch_size) is not int or batch_size < 1:
        raise ValidationError("batch_size must be a positive int")
    if not _is_real(lr) or lr <= 0:
        raise ValidationError("lr must be a positive number")
    if len(clips) == 0:
        raise ValidationError("no clips to train on")
    if engine not in ("learner", "opacus"):
        raise ValidationError("engine must be 'learner' or 'opacus'")
    if engine == "learner":
        return _learner_run(
            clips, labels, num_classes=num_classes, epochs=epochs, lr=lr, batch_size=batch_size,
            init=init, dp=dp, seed=seed,
        )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = VideoModel(num_classes=num_classes, dp=dp is not None)
        if init is not None:
            from_named_arrays(model, init)
        generator = torch.Generator().manual_seed(seed)
        data = TensorDataset(torch.from_numpy(clips), torch.from_numpy(labels.astype(np.int64)))
        loader = DataLoader(data, batch_size=min(batch_size, len(clips)), shuffle=True, generator=generator)
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        loss_fn = nn.CrossEntropyLoss()
        if dp is None:
            steps = _plain_loop(model, optimizer, loader, loss_fn, epochs)
            model.eval()
            return TrainedModel(
                model=model, epsilon=None, noise_multiplier=None, sample_rate=None, steps=steps
            )
        return _dp_run(model, optimizer, loader, loss_fn, epochs, dp, num_classes)


def _plain_loop(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader[tuple[torch.Tensor, ...]],
    loss_fn: nn.Module,
    epochs: int,
    *,
    skip_empty: bool = True,
) -> int:
    model.train()
    steps = 0
    for _ in range(epochs):
        for x, y in loader:
            if skip_empty and len(y) == 0:
                continue  # (DP runs keep empty Poisson batches: Opacus accounts for every step)
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step()
            steps += 1
    return steps


def _dp_run(
    model: VideoModel,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader[tuple[torch.Tensor, ...]],
    loss_fn: nn.Module,
    epochs: int,
    dp: DPSpec,
    num_classes: int,
) -> TrainedModel:
    from opacus import PrivacyEngine

    engine = PrivacyEngine(accountant="rdp")
    with warnings.catch_warnings():
        # Opacus warns that secure_mode is off: this is a simulation of the device's training for attacks,
        # whose noise need not be unpredictable; the device's own learner uses its DP wrapper.
        warnings.simplefilter("ignore")
        if dp.target_epsilon is not None:
            pmodel, poptimizer, ploader = engine.make_private_with_epsilon(
                module=model,
                optimizer=optimizer,
                data_loader=loader,
                target_epsilon=dp.target_epsilon,
                target_delta=dp.delta,
                epochs=epochs,
                max_grad_norm=dp.max_grad_norm,
                poisson_sampling=True,
            )
        else:
            pmodel, poptimizer, ploader = engine.make_private(
                module=model,
                optimizer=optimizer,
                data_loader=loader,
                noise_multiplier=dp.noise_multiplier,
                max_grad_norm=dp.max_grad_norm,
                poisson_sampling=True,
            )
        steps = _plain_loop(pmodel, poptimizer, ploader, loss_fn, epochs, skip_empty=False)
        noise = float(poptimizer.noise_multiplier)
        epsilon = float(engine.get_epsilon(dp.delta)) if noise > 0 else math.inf
    sample_rate = float(1.0 / len(ploader)) if len(ploader) else 1.0
    # Hand back a plain VideoModel with the trained weights (DPLSTM and nn.LSTM share names and shapes).
    plain = VideoModel(num_classes=num_classes)
    from_named_arrays(plain, to_named_arrays(model))
    plain.eval()
    return TrainedModel(
        model=plain, epsilon=epsilon, noise_multiplier=noise, sample_rate=sample_rate, steps=steps
    )


def _learner_run(
    clips: np.ndarray,
    labels: np.ndarray,
    *,
    num_classes: int,
    epochs: int,
    lr: float,
    batch_size: int,
    init: Mapping[str, np.ndarray] | None,
    dp: DPSpec | None,
    seed: int,
) -> TrainedModel:
    """One run of the device's :func:`fedfer.agent.learning.personalize.finetune_v`."""
    from fedfer.agent.learning.dp import DPConfig
    from fedfer.agent.learning.personalize import PersonalizeConfig, finetune_v

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if init is None:
            init = to_named_arrays(VideoModel(num_classes=num_classes))
        config = PersonalizeConfig(lr=float(lr), epochs=epochs, batch_size=batch_size, seed=seed)
        dp_config = None
        if dp is not None:
            if dp.noise_multiplier == 0.0:
                raise ValidationError("the learner refuses a zero noise multiplier; use engine='opacus'")
            dp_config = DPConfig(
                target_epsilon=dp.target_epsilon,
                noise_multiplier=dp.noise_multiplier,
                delta=dp.delta,
                max_grad_norm=dp.max_grad_norm,
            )
        model, result = finetune_v(init, clips, labels, num_classes=num_classes, config=config, dp=dp_config)
    steps = epochs * math.ceil(len(clips) / min(batch_size, len(clips)))
    return TrainedModel(
        model=model,
        epsilon=result.epsilon,
        noise_multiplier=result.noise_multiplier,
        sample_rate=None if dp is None else poisson_rate(len(clips), batch_size),
        steps=steps,
    )
