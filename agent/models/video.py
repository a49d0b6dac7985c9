"""The video model ``v`` (Salman & Busso, ICMI 2022): per-frame FC 1280→128 → FC 128→64 → LSTM(64),
many-to-one, → K-way linear, and its framework-free form.

Only ``v`` travels in federated rounds; :func:`to_named_arrays` / :func:`from_named_arrays` convert it to the
named float32 arrays the aggregator handles (it never needs torch).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from fedfer.agent.records import FEATURE_DIM, check_num_classes
from fedfer.security.errors import ValidationError

__all__ = ["VideoModel", "from_named_arrays", "to_named_arrays"]


class VideoModel(nn.Module):
    """``v``: the small video classifier personalized on the device and averaged across devices.

    Input ``(batch, time, 1280)`` with zero pre-padding; logits ``(batch, K)`` from the LSTM's last step.
    ``dp=True`` swaps ``nn.LSTM`` for Opacus' ``DPLSTM`` (same parameter names and shapes, so state dicts load
    either way and the federated update is identical in form).
    """

    def __init__(self, *, num_classes: int, dp: bool = False) -> None:
        check_num_classes(num_classes)
        super().__init__()
        self.num_classes = num_classes
        self.frame = nn.Sequential(
            # Not in-place: Opacus' backward hooks forbid modifying their outputs in place.
            nn.Linear(FEATURE_DIM, 128),
            nn.ReLU(),
            nn.Linear(128, 64),
            nn.ReLU(),
        )
        if dp:
            from opacus.layers import DPLSTM

            self.lstm: nn.Module = DPLSTM(64, 64, batch_first=True)
        else:
            self.lstm = nn.LSTM(64, 64, batch_first=True)
        self.out = nn.Linear(64, num_classes)

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, K)`` for clips ``(B, T, 1280)``."""
        x = self.frame(clips)
        seq, _ = self.lstm(x)
        return self.out(seq[:, -1, :])  # type: ignore[no-any-return]


def _unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside Opacus' ``GradSampleModule`` (or the module itself)."""
    inner = getattr(model, "_module", None)
    return inner if isinstance(inner, nn.Module) else model


def _canonical_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers under their canonical names.

    ``DPLSTM``'s state dict carries alias keys (``lstm.l0.ih.weight`` beside ``lstm.weight_ih_l0``) for the
    same tensors; ``named_parameters`` lists each tensor once under the ``nn.LSTM`` name, so the arrays that
    travel are identical whether or not DP is on.
    """
    m = _unwrap(model)
    out: dict[str, torch.Tensor] = dict(m.named_parameters())
    out.update(dict(m.named_buffers()))
    return out


def to_named_arrays(model: nn.Module) -> dict[str, np.ndarray]:
    """The model's parameters as float32 numpy arrays keyed by canonical name (what travels).

    The same for ``VideoModel(dp=False)`` and ``VideoModel(dp=True)`` (also when wrapped by Opacus).
    """
    return {
        k: v.detach().cpu().numpy().astype(np.float32, copy=True)
        for k, v in sorted(_canonical_tensors(model).items())
    }


def from_named_arrays(model: nn.Module, arrays: Mapping[str, np.ndarray]) -> None:
    """Load named arrays into ``model`` in place; names and shapes must match exactly.

    Raises:
        ValidationError: names differ, a shape differs or a value is not finite.
    """
    tensors = _canonical_tensors(model)
    if set(arrays) != set(tensors):
        raise ValidationError("named arrays do not match the model's parameter names")
    for name, tensor in tensors.items():
        arr = np.asarray(arrays[name])
        if tuple(arr.shape) != tuple(tensor.shape):
            raise ValidationError(f"shape mismatch for parameter {name!r}")
        if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
            raise ValidationError(f"parameter {name!r} holds non-finite values")
    with torch.no_grad():
        for name, tensor in tensors.items():
            tensor.copy_(torch.from_numpy(np.asarray(arrays[name], dtype=np.float32)).to(tensor.dtype))
