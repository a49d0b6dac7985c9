"""MobileNetV2 1.0 (``f``), written in the project, with torchvision-identical state-dict keys.

The module tree mirrors torchvision's ``mobilenet_v2`` exactly (``features.0.0.weight``,
``features.0.1.running_mean``, ..., ``features.18.0.weight``, ``classifier.1.weight``), so torchvision's
official ImageNet weight file loads unchanged with ``load_state_dict(strict=True)``. Two sources of real
weights exist:

* **torchvision** (``mobilenet_v2-b0353104.pth``, fetched by :mod:`fedfer.agent.models.weights`): expects
  ImageNet mean/std normalization of RGB in ``[0, 1]`` (:data:`IMAGENET_NORMALIZATION`) and PyTorch's
  symmetric padding.
* **TFLite-converted** (:mod:`fedfer.agent.models.tflite`): expects TensorFlow's ``[-1, 1]`` input
  (``(pixel - 128) / 128``, :data:`TF_NORMALIZATION`) and TensorFlow's asymmetric ``SAME`` padding for the
  stride-2 convolutions (``tf_padding=True``).

:func:`fedfer.agent.models.extractor.load_feature_extractor` picks both the architecture variant and the
normalization from the weight file, so callers cannot mix them up.
"""

from __future__ import annotations

import copy
import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fedfer.agent.records import FEATURE_DIM
from fedfer.security.errors import ValidationError

__all__ = [
    "IMAGENET_NORMALIZATION",
    "INPUT_SIZE",
    "TF_NORMALIZATION",
    "ActivationQuantization",
    "MobileNetV2",
    "Normalization",
    "fold_batchnorm",
]

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


def fold_batchnorm(model: MobileNetV2) -> MobileNetV2:
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
