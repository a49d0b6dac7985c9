"""MobileNetV2 1.0 (``f``), written in the project, with torchvision-identical state-dict keys.

The module tree mirrors torchvision's ``mobilenet_v2`` exactly (``features.0.0.weight``,
``features.0.1.running_mean``, ..., ``features.18.0.weight``, ``classifier.1.weight``), so torchvision's
official ImageNet weight file loads unchanged with ``load_state_dict(strict=True)``. Two sources of real
weights exist:

* **torchvision** (``mobilenet_v2-b0353104.pth``, fetched by :mod:`agent.weights`): expects ImageNet mean/std
  normalization of RGB in ``[0, 1]`` (:data:`IMAGENET_NORMALIZATION`) and PyTorch's symmetric padding.
* **TFLite-converted** (:mod:`agent.tflite_convert`): expects TensorFlow's ``[-1, 1]`` input
  (``(pixel - 128) / 128``, :data:`TF_NORMALIZATION`) and TensorFlow's asymmetric ``SAME`` padding for the
  stride-2 convolutions (``tf_padding=True``).

:func:`load_feature_extractor` picks both the architecture variant and the normalization from the weight
file, so callers cannot mix them up. Inference runs under ``torch.inference_mode()`` in ``channels_last``
layout.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedfer.security.errors import FedferError, ValidationError

__all__ = [
    "FEATURE_DIM",
    "IMAGENET_NORMALIZATION",
    "INPUT_SIZE",
    "TF_NORMALIZATION",
    "ActivationQuantization",
    "FeatureExtractor",
    "MobileNetV2",
    "Normalization",
    "WeightsError",
    "load_feature_extractor",
]

FEATURE_DIM = 1280
INPUT_SIZE = 224

# (expansion t, output channels c, repeats n, first stride s) as in Sandler et al. 2018, Table 2.
_INVERTED_RESIDUAL_SETTING: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class WeightsError(FedferError):
    """A weight file is missing, unreadable, has the wrong hash or does not fit the architecture."""


@dataclass(frozen=True, slots=True)
class Normalization:
    """Per-channel normalization of RGB values scaled to ``[0, 1]``: ``(x - mean) / std``.

    Attributes:
        name: short identifier (``"imagenet"`` or ``"tf"``).
        mean: per-channel mean (R, G, B).
        std: per-channel standard deviation (R, G, B).
    """

    name: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


#: torchvision's ImageNet weights.
IMAGENET_NORMALIZATION = Normalization("imagenet", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
#: TensorFlow/TFLite MobileNetV2: ``(pixel - 128) / 128``, exactly what the uint8 model's input
#: dequantizes to.
TF_NORMALIZATION = Normalization("tf", (128 / 255,) * 3, (128 / 255,) * 3)


class _Conv2d(nn.Conv2d):
    """``nn.Conv2d`` that optionally reproduces TensorFlow's ``SAME`` padding (extra pixel bottom/right).

    PyTorch pads a 3x3 stride-2 convolution by one pixel on every side; TensorFlow pads an even-sized input by
    zero pixels on the top/left and one on the bottom/right, so the sampling grid is shifted by one pixel.
    Parameters are those of ``nn.Conv2d``, so state-dict keys are unchanged.
    """

    def __init__(
        self, in_ch: int, out_ch: int, kernel: int, *, stride: int, groups: int, tf_same: bool
    ) -> None:
        self.tf_same = tf_same and kernel > 1
        padding = 0 if self.tf_same else (kernel - 1) // 2
        super().__init__(in_ch, out_ch, kernel, stride=stride, padding=padding, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Convolve ``x`` (N, C, H, W)."""
        if self.tf_same:
            x = F.pad(x, _same_pads(x.shape[-2], x.shape[-1], self.kernel_size[0], self.stride[0]))
        return super().forward(x)


def _same_pads(height: int, width: int, kernel: int, stride: int) -> tuple[int, int, int, int]:
    def one(size: int) -> tuple[int, int]:
        total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
        return total // 2, total - total // 2

    top, bottom = one(height)
    left, right = one(width)
    return left, right, top, bottom


_QParams = tuple[float, int]


def _fake_quant(x: torch.Tensor, qparams: _QParams | None) -> torch.Tensor:
    if qparams is None:
        return x
    scale, zero = qparams
    # Same result as torch.fake_quantize_per_tensor_affine(x, scale, zero, 0, 255), about 4x faster on CPU.
    return x.mul(1.0 / scale).round_().clamp_(-zero, 255 - zero).mul_(scale)


@dataclass(frozen=True, slots=True)
class ActivationQuantization:
    """uint8 activation ranges ``(scale, zero_point)`` of a quantization-aware-trained TFLite MobileNetV2.

    The TFLite weights were trained with fake-quantized activations; replaying that rounding (without any
    parameter of its own, so state dicts are unchanged) makes the float model track the interpreter closely.

    Attributes:
        convs: output range of every convolution (with its BN and ReLU6) in graph order (52 entries).
        adds: output range of every residual addition in graph order (10 entries).
        pool: output range of the global average pool.
    """

    convs: tuple[_QParams, ...]
    adds: tuple[_QParams, ...]
    pool: _QParams


class _ConvBNReLU(nn.Sequential):
    """Conv + BatchNorm + ReLU6 (torchvision's ``Conv2dNormActivation`` layout: keys ``0.*``, ``1.*``)."""

    act_quant: _QParams | None = None

    def __init__(
        self, in_ch: int, out_ch: int, *, kernel: int = 3, stride: int = 1, groups: int = 1, tf_same: bool
    ) -> None:
        super().__init__(
            _Conv2d(in_ch, out_ch, kernel, stride=stride, groups=groups, tf_same=tf_same),
            nn.BatchNorm2d(out_ch),
            nn.ReLU6(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Conv, BN, ReLU6 (then the optional activation fake-quantization)."""
        for layer in self:
            x = layer(x)
        return _fake_quant(x, self.act_quant)


class _InvertedResidual(nn.Module):
    """MobileNetV2 bottleneck: (expand 1x1) → depthwise 3x3 → linear 1x1 projection (+ residual)."""

    def __init__(self, in_ch: int, out_ch: int, *, stride: int, expand: int, tf_same: bool) -> None:
        super().__init__()
        hidden = in_ch * expand
        self.use_res_connect = stride == 1 and in_ch == out_ch
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(_ConvBNReLU(in_ch, hidden, kernel=1, tf_same=tf_same))
        layers += [
            _ConvBNReLU(hidden, hidden, stride=stride, groups=hidden, tf_same=tf_same),
            _Conv2d(hidden, out_ch, 1, stride=1, groups=1, tf_same=tf_same),
            nn.BatchNorm2d(out_ch),
        ]
        self.conv = nn.Sequential(*layers)
        self.out_channels = out_ch
        self.project_quant: _QParams | None = None
        self.add_quant: _QParams | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block."""
        y = _fake_quant(self.conv(x), self.project_quant)
        if self.use_res_connect:
            return _fake_quant(x + y, self.add_quant)
        return y


class MobileNetV2(nn.Module):
    """MobileNetV2, width 1.0, 224x224 input; ``forward`` gives ImageNet logits, :meth:`features_of` the
    1,280-d global-average-pooled feature ``f(x)``.

    Args:
        num_classes: classifier outputs (1,000 for ImageNet).
        tf_padding: reproduce TensorFlow's asymmetric ``SAME`` padding (needed by TFLite-converted weights).
        dropout: dropout before the classifier (inactive in eval mode).
    """

    def __init__(self, *, num_classes: int = 1000, tf_padding: bool = False, dropout: float = 0.2) -> None:
        if type(num_classes) is not int or num_classes < 1:
            raise ValidationError("num_classes must be a positive int")
        if type(tf_padding) is not bool:
            raise ValidationError("tf_padding must be a bool")
        if not 0.0 <= dropout < 1.0:
            raise ValidationError("dropout must lie in [0, 1)")
        super().__init__()
        self.tf_padding = tf_padding
        self.num_classes = num_classes
        layers: list[nn.Module] = [_ConvBNReLU(3, 32, stride=2, tf_same=tf_padding)]
        in_ch = 32
        for t, c, n, s in _INVERTED_RESIDUAL_SETTING:
            for i in range(n):
                layers.append(
                    _InvertedResidual(in_ch, c, stride=s if i == 0 else 1, expand=t, tf_same=tf_padding)
                )
                in_ch = c
        layers.append(_ConvBNReLU(in_ch, FEATURE_DIM, kernel=1, tf_same=tf_padding))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(FEATURE_DIM, num_classes))
        self.pool_quant: _QParams | None = None
        self.emulates_quantization = False
        self._init_weights()

    def set_activation_quantization(self, ranges: ActivationQuantization | None) -> None:
        """Replay (or, with ``None``, stop replaying) a TFLite model's uint8 activation rounding.

        Raises:
            ValidationError: ``ranges`` does not have one entry per convolution / residual addition.
        """
        # Graph order of convolution outputs: every CNA in module order, a block's projection after its CNAs.
        order: list[tuple[object, str]] = []
        for m in self.features:
            if isinstance(m, _ConvBNReLU):
                order.append((m, "act_quant"))
            elif isinstance(m, _InvertedResidual):
                order += [(c, "act_quant") for c in m.conv.children() if isinstance(c, _ConvBNReLU)]
                order.append((m, "project_quant"))
        residual = [m for m in self.features if isinstance(m, _InvertedResidual) and m.use_res_connect]
        if ranges is None:
            for obj, attr in order:
                setattr(obj, attr, None)
            for b in residual:
                b.add_quant = None
            self.pool_quant = None
            self.emulates_quantization = False
            return
        if len(ranges.convs) != len(order) or len(ranges.adds) != len(residual):
            raise ValidationError("activation ranges do not match the MobileNetV2 graph")
        for (obj, attr), q in zip(order, ranges.convs, strict=True):
            setattr(obj, attr, (float(q[0]), int(q[1])))
        for b, q in zip(residual, ranges.adds, strict=True):
            b.add_quant = (float(q[0]), int(q[1]))
        self.pool_quant = (float(ranges.pool[0]), int(ranges.pool[1]))
        self.emulates_quantization = True

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def features_of(self, x: torch.Tensor) -> torch.Tensor:
        """The 1,280-d feature ``f(x)`` (N, 1280) for normalized images ``x`` (N, 3, 224, 224)."""
        return torch.flatten(_fake_quant(F.adaptive_avg_pool2d(self.features(x), 1), self.pool_quant), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits (N, num_classes) for normalized images ``x`` (N, 3, 224, 224)."""
        return self.classifier(self.features_of(x))  # type: ignore[no-any-return]


def _fold_batchnorm(model: MobileNetV2) -> MobileNetV2:
    """An eval-mode copy of ``model`` with every BatchNorm folded into the convolution before it."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    folded = copy.deepcopy(model).eval()
    for module in folded.modules():
        if not isinstance(module, nn.Sequential):
            continue
        children = list(module._modules.items())
        for (conv_name, conv), (bn_name, bn) in itertools.pairwise(children):
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                module._modules[conv_name] = fuse_conv_bn_eval(conv, bn)
                module._modules[bn_name] = nn.Identity()
    return folded


class FeatureExtractor:
    """Frozen ``f``: uint8 RGB face crops in, float32 1,280-d features out.

    Owns the model and the normalization that belongs to its weights. Batches are normalized in one fused
    multiply-add and run under ``torch.inference_mode()`` through a copy of the model whose batch norms are
    folded into the convolutions (52 fewer passes over the activations), laid out ``channels_last``; results
    are deterministic for the same input. ``model`` itself is left as given (unfused, trainable layout).

    Args:
        model: a :class:`MobileNetV2` holding real weights (put in eval mode here).
        normalization: the normalization those weights were trained with.
        channels_last: use the channels-last memory format (the fast path); ``False`` is the naive baseline.
        batch_size: maximum images per forward pass.
        fuse_batchnorm: run a BN-folded copy (the fast path); ``False`` runs ``model`` as is.
    """

    def __init__(
        self,
        *,
        model: MobileNetV2,
        normalization: Normalization,
        channels_last: bool = True,
        batch_size: int = 4,
        fuse_batchnorm: bool = True,
    ) -> None:
        if not isinstance(model, MobileNetV2):
            raise ValidationError("model must be a MobileNetV2")
        if not isinstance(normalization, Normalization):
            raise ValidationError("normalization must be a Normalization")
        if type(batch_size) is not int or batch_size < 1:
            raise ValidationError("batch_size must be a positive int")
        self.normalization = normalization
        self.channels_last = bool(channels_last)
        self.batch_size = batch_size
        self.fuse_batchnorm = bool(fuse_batchnorm)
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self._runner = _fold_batchnorm(self.model) if self.fuse_batchnorm else self.model
        if self.channels_last:
            self._runner = self._runner.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        std = torch.tensor(normalization.std, dtype=torch.float32)
        mean = torch.tensor(normalization.mean, dtype=torch.float32)
        # (x / 255 - mean) / std == x * scale + shift
        self._scale = (1.0 / (255.0 * std)).view(1, 3, 1, 1)
        self._shift = (-mean / std).view(1, 3, 1, 1)

    def __repr__(self) -> str:
        return (
            f"FeatureExtractor(normalization={self.normalization.name!r}, "
            f"tf_padding={self.model.tf_padding}, "
            f"quantized_activations={self.model.emulates_quantization}, channels_last={self.channels_last}, "
            f"fused={self.fuse_batchnorm}, batch_size={self.batch_size})"
        )

    def _to_input(self, images: np.ndarray) -> torch.Tensor:
        if (
            not isinstance(images, np.ndarray)
            or images.dtype != np.uint8
            or images.ndim != 4
            or images.shape[1:] != (INPUT_SIZE, INPUT_SIZE, 3)
        ):
            raise ValidationError("images must be a uint8 array of shape (N, 224, 224, 3) in RGB order")
        # NHWC uint8 -> NCHW view whose strides are already channels_last; no copy until the float cast.
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
        x = x.float() * self._scale + self._shift
        if self.channels_last:
            return x.contiguous(memory_format=torch.channels_last)
        return x.contiguous()

    def _run(self, images: np.ndarray, *, logits: bool) -> np.ndarray:
        out_dim = self.model.num_classes if logits else FEATURE_DIM
        if len(images) == 0:
            self._to_input(np.zeros((1, INPUT_SIZE, INPUT_SIZE, 3), np.uint8))  # validates dtype/shape only
            return np.zeros((0, out_dim), np.float32)
        chunks: list[np.ndarray] = []
        with torch.inference_mode():
            for start in range(0, len(images), self.batch_size):
                x = self._to_input(images[start : start + self.batch_size])
                y = self._runner(x) if logits else self._runner.features_of(x)
                chunks.append(y.numpy().astype(np.float32, copy=True))
        return np.concatenate(chunks, axis=0)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """Features ``(N, 1280)`` float32 for uint8 RGB images ``(N, 224, 224, 3)``."""
        return self._run(images, logits=False)

    def logits(self, images: np.ndarray) -> np.ndarray:
        """ImageNet logits ``(N, 1000)`` float32 (torchvision order) for uint8 RGB ``(N, 224, 224, 3)``."""
        return self._run(images, logits=True)


def _load_state(model: MobileNetV2, state: Mapping[str, torch.Tensor]) -> None:
    try:
        model.load_state_dict(dict(state), strict=True)
    except (RuntimeError, KeyError) as exc:
        raise WeightsError("weight file does not match the MobileNetV2 architecture") from exc


def load_feature_extractor(
    weights: str | Path,
    *,
    cache_dir: str | Path | None = None,
    sha256: str | None = None,
    emulate_tflite_quantization: bool = False,
    channels_last: bool = True,
    batch_size: int = 4,
    fuse_batchnorm: bool = True,
) -> FeatureExtractor:
    """Build ``f`` with real ImageNet weights from a local file.

    A ``.tflite`` file is converted by :mod:`agent.tflite_convert` (cached under ``cache_dir`` keyed by the
    file's SHA-256) and paired with TF padding and :data:`TF_NORMALIZATION`; any other file is read as a
    torchvision state dict (``mobilenet_v2-b0353104.pth``) and paired with :data:`IMAGENET_NORMALIZATION`.

    Args:
        weights: path of the weight file.
        cache_dir: where converted TFLite weights are cached (default:
            :func:`agent.tflite_convert.default_cache_dir`).
        sha256: if given, the file's SHA-256 must equal it (the full 64-digit hex digest; a prefix is refused
            with ValidationError), else :class:`WeightsError`.
        emulate_tflite_quantization: for ``.tflite`` weights, replay the TFLite graph's uint8 activation
            rounding (closest to the interpreter's outputs; about 10% slower). Off by default: the pipeline's
            features come from the plain float network.
        channels_last: see :class:`FeatureExtractor`.
        batch_size: see :class:`FeatureExtractor`.
        fuse_batchnorm: see :class:`FeatureExtractor`.

    Returns:
        A ready :class:`FeatureExtractor` in eval mode.

    Raises:
        WeightsError: missing/unreadable file, hash mismatch or incompatible tensors.
    """
    from fedfer.agent.weights import verify_sha256

    path = Path(weights)
    if not path.is_file():
        raise WeightsError(f"weight file not found: {path}")
    if sha256 is not None:
        verify_sha256(path, sha256)
    if path.suffix == ".tflite":
        from fedfer.agent.tflite_convert import load_converted

        converted = load_converted(path, cache_dir=cache_dir)
        model = MobileNetV2(tf_padding=True)
        _load_state(model, converted.state_dict)
        if emulate_tflite_quantization:
            model.set_activation_quantization(converted.activation_quantization)
        normalization = TF_NORMALIZATION
    else:
        if emulate_tflite_quantization:
            raise ValidationError("emulate_tflite_quantization applies to .tflite weights only")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for a corrupt file; all mean "unreadable"
            raise WeightsError(f"cannot read weight file {path.name}") from exc
        if not isinstance(state, Mapping):
            raise WeightsError("weight file does not hold a state dict")
        model = MobileNetV2(tf_padding=False)
        _load_state(model, state)
        normalization = IMAGENET_NORMALIZATION
    return FeatureExtractor(
        model=model,
        normalization=normalization,
        channels_last=channels_last,
        batch_size=batch_size,
        fuse_batchnorm=fuse_batchnorm,
    )
