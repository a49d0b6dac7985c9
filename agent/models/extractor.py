"""``f`` as the device runs it: :class:`FeatureExtractor` over a MobileNetV2 holding real weights, built from
a weight file by :func:`load_feature_extractor`.

The weight file decides the variant: a ``.tflite`` file is converted (TF padding, :data:`TF_NORMALIZATION`),
any other file is a torchvision state dict (:data:`IMAGENET_NORMALIZATION`), so a caller cannot pair weights
with the wrong padding or normalization. Inference runs under ``torch.inference_mode()`` in ``channels_last``
layout.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from fedfer.agent.models.mobilenet import (
    IMAGENET_NORMALIZATION,
    INPUT_SIZE,
    TF_NORMALIZATION,
    MobileNetV2,
    Normalization,
    fold_batchnorm,
)
from fedfer.agent.models.tflite import load_converted
from fedfer.agent.models.weights import WeightsError, verify_sha256
from fedfer.agent.records import FEATURE_DIM
from fedfer.security.errors import ValidationError

__all__ = ["FeatureExtractor", "load_feature_extractor"]


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
        self._runner = fold_batchnorm(self.model) if self.fuse_batchnorm else self.model
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

    A ``.tflite`` file is converted by :mod:`fedfer.agent.models.tflite` (cached under ``cache_dir`` keyed by
    the file's SHA-256) and paired with TF padding and :data:`TF_NORMALIZATION`; any other file is read as a
    torchvision state dict (``mobilenet_v2-b0353104.pth``) and paired with :data:`IMAGENET_NORMALIZATION`.

    Args:
        weights: path of the weight file.
        cache_dir: where converted TFLite weights are cached (default:
            :func:`fedfer.agent.files.cache_dir`).
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
    path = Path(weights)
    if not path.is_file():
        raise WeightsError(f"weight file not found: {path}")
    if sha256 is not None:
        verify_sha256(path, sha256)
    if path.suffix == ".tflite":
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
