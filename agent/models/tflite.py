"""Build real ImageNet weights for :class:`fedfer.agent.models.mobilenet.MobileNetV2` from a quantized TFLite
MobileNetV2.

The TFLite file (``mobilenet_v2_1.0_224_quant.tflite``) holds uint8 weights with batch norm already folded
into each convolution's weights and int32 bias. The conversion:

* dequantizes every tensor (``scale * (q - zero_point)``; biases have zero point 0);
* reorders weights from TFLite's ``OHWI`` (``1HWC`` for depthwise) to PyTorch's ``OIHW``;
* emits an *identity* BatchNorm after each convolution: ``weight=1``, ``bias=`` the folded bias,
  ``running_mean=0`` and ``running_var=1 - eps`` so ``sqrt(running_var + eps) == 1`` and eps cancels;
* keeps the 1,000 ImageNet classes of torchvision's order, dropping TFLite's class 0 ("background"),
  so TFLite class ``i + 1`` is torchvision class ``i``.

The converted weights must be run with ``MobileNetV2(tf_padding=True)`` (TensorFlow pads stride-2 convolutions
asymmetrically) and fed ``(pixel - 128) / 128`` (:data:`fedfer.agent.models.mobilenet.TF_NORMALIZATION`);
:func:`fedfer.agent.models.extractor.load_feature_extractor` does both. Tensors are read with the
``ai_edge_litert`` interpreter (a development dependency); the result is cached as a plain state dict keyed by
the source file's SHA-256, so devices and later runs need neither the interpreter nor a second conversion. The
cache entry is trusted only with its sidecar (``<entry>.sha256``, the entry's own SHA-256, written atomically
after it): a missing sidecar or a mismatch (a corrupted, truncated or replaced entry, a crash between the two
writes) means the weights are converted again. This detects damage and a swapped entry, not an attacker who
can rewrite both files (the folder is the user's private 0700 cache).
"""

from __future__ import annotations

import hashlib
import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedfer.agent.files import cache_dir as files_cache_dir
from fedfer.agent.models.mobilenet import ActivationQuantization, MobileNetV2
from fedfer.agent.models.weights import WeightsError, sha256_file, verify_sha256
from fedfer.security.files import write_atomic

__all__ = [
    "BN_EPS",
    "ConvertedWeights",
    "convert_tflite",
    "load_converted",
]

_log = logging.getLogger(__name__)

#: PyTorch BatchNorm2d's default eps; the identity BN uses running_var = 1 - BN_EPS.
BN_EPS = 1e-5
_CONV_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D")
_CACHE_FORMAT = "v2"


@dataclass(frozen=True, slots=True)
class ConvertedWeights:
    """The result of a conversion.

    Attributes:
        state_dict: torchvision-keyed float32 tensors for ``MobileNetV2(tf_padding=True)``.
        activation_quantization: the TFLite graph's uint8 activation ranges, for
            :meth:`fedfer.agent.models.mobilenet.MobileNetV2.set_activation_quantization` (optional replay).
    """

    state_dict: dict[str, torch.Tensor]
    activation_quantization: ActivationQuantization


def _dequantize(tensor: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
    params = detail["quantization_parameters"]
    scales = np.asarray(params["scales"], dtype=np.float64)
    zeros = np.asarray(params["zero_points"], dtype=np.float64)
    if scales.size == 0:  # already float
        return np.asarray(tensor, dtype=np.float32)
    if scales.size != 1:
        # Per-channel quantization along quantized_dimension.
        axis = int(params["quantized_dimension"])
        shape = [1] * tensor.ndim
        shape[axis] = -1
        scales = scales.reshape(shape)
        zeros = zeros.reshape(shape)
    return ((tensor.astype(np.float64) - zeros) * scales).astype(np.float32)


def _conv_layers(model: MobileNetV2) -> list[tuple[str, str, bool]]:
    """(conv weight key, BN prefix, is depthwise) for every convolution in graph order."""
    out: list[tuple[str, str, bool]] = []
    names = dict(model.named_modules())
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Conv2d):
            parent, _, index = name.rpartition(".")
            bn_name = f"{parent}.{int(index) + 1}"
            if not isinstance(names.get(bn_name), torch.nn.BatchNorm2d):
                raise WeightsError(
                    "unexpected MobileNetV2 layout"
                )  # pragma: no cover - architecture invariant
            out.append((f"{name}.weight", bn_name, module.groups > 1))
    return out


def _qparams(detail: dict[str, Any]) -> tuple[float, int]:
    scale, zero = detail["quantization"]
    if detail["dtype"] is not np.uint8 or not scale > 0:
        raise WeightsError("TFLite activations are not uint8-quantized")
    return float(scale), int(zero)


def convert_tflite(path: str | Path) -> ConvertedWeights:
    """Convert a quantized TFLite MobileNetV2 1.0/224 into torchvision-keyed float32 weights.

    Args:
        path: the ``.tflite`` file.

    Returns:
        The state dict (loads with ``strict=True`` into ``MobileNetV2(tf_padding=True)``) and the graph's
        activation ranges.

    Raises:
        WeightsError: the interpreter is not installed, or the file is not a MobileNetV2 1.0/224 of this form.
    """
    try:
        from ai_edge_litert.interpreter import Interpreter, OpResolverType
    except ImportError as exc:
        raise WeightsError("converting TFLite weights needs the ai_edge_litert dev dependency") from exc
    try:
        interpreter = Interpreter(
            model_path=str(path),
            experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
        )
        interpreter.allocate_tensors()
    except (ValueError, RuntimeError) as exc:
        raise WeightsError(f"cannot read TFLite model {Path(path).name}") from exc
    details = {int(d["index"]): d for d in interpreter.get_tensor_details()}
    # Without delegates every op keeps its builtin name and its (input, weights, bias) operand order.
    ops = interpreter._get_ops_details()
    convs = [op for op in ops if op["op_name"] in _CONV_OPS]
    adds = [op for op in ops if op["op_name"] == "ADD"]
    pools = [op for op in ops if op["op_name"] == "AVERAGE_POOL_2D"]
    if len(pools) != 1:
        raise WeightsError("TFLite graph is not a MobileNetV2 1.0/224")

    model = MobileNetV2(tf_padding=True)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    layers = _conv_layers(model)
    if len(convs) != len(layers) + 1:  # + the 1x1 logits convolution
        raise WeightsError("TFLite graph is not a MobileNetV2 1.0/224")

    for op, (weight_key, bn, depthwise) in zip(convs[:-1], layers, strict=True):
        _, w_idx, b_idx = (int(i) for i in op["inputs"])
        w = _dequantize(interpreter.get_tensor(w_idx), details[w_idx])
        b = _dequantize(interpreter.get_tensor(b_idx), details[b_idx])
        is_dw = op["op_name"] == "DEPTHWISE_CONV_2D"
        if is_dw != depthwise:
            raise WeightsError("TFLite graph is not a MobileNetV2 1.0/224")
        # OHWI -> OIHW; depthwise 1HWC -> C1HW.
        w_t = w.transpose(3, 0, 1, 2) if is_dw else w.transpose(0, 3, 1, 2)
        if tuple(w_t.shape) != tuple(state[weight_key].shape) or b.shape != (w_t.shape[0],):
            raise WeightsError("TFLite graph is not a MobileNetV2 1.0/224")
        state[weight_key] = torch.from_numpy(np.ascontiguousarray(w_t))
        channels = w_t.shape[0]
        state[f"{bn}.weight"] = torch.ones(channels)
        state[f"{bn}.bias"] = torch.from_numpy(b)
        state[f"{bn}.running_mean"] = torch.zeros(channels)
        state[f"{bn}.running_var"] = torch.full((channels,), 1.0 - BN_EPS)

    logits = convs[-1]
    _, w_idx, b_idx = (int(i) for i in logits["inputs"])
    w = _dequantize(interpreter.get_tensor(w_idx), details[w_idx])
    b = _dequantize(interpreter.get_tensor(b_idx), details[b_idx])
    if w.shape != (1001, 1, 1, 1280) or b.shape != (1001,):
        raise WeightsError("TFLite classifier is not the 1001-class ImageNet head")
    state["classifier.1.weight"] = torch.from_numpy(np.ascontiguousarray(w[1:, 0, 0, :]))
    state["classifier.1.bias"] = torch.from_numpy(np.ascontiguousarray(b[1:]))
    ranges = ActivationQuantization(
        convs=tuple(_qparams(details[int(op["outputs"][0])]) for op in convs[:-1]),
        adds=tuple(_qparams(details[int(op["outputs"][0])]) for op in adds),
        pool=_qparams(details[int(pools[0]["outputs"][0])]),
    )
    model.set_activation_quantization(ranges)  # checks the counts against the architecture
    return ConvertedWeights(state_dict=state, activation_quantization=ranges)


def _to_cache(converted: ConvertedWeights) -> dict[str, Any]:
    q = converted.activation_quantization
    return {
        "state_dict": converted.state_dict,
        "act_convs": torch.tensor(q.convs, dtype=torch.float64),
        "act_adds": torch.tensor(q.adds, dtype=torch.float64),
        "act_pool": torch.tensor(q.pool, dtype=torch.float64),
    }


def _from_cache(blob: Any) -> ConvertedWeights:
    if not isinstance(blob, dict) or not isinstance(blob.get("state_dict"), dict):
        raise WeightsError("corrupt conversion cache entry")

    def pairs(t: torch.Tensor) -> tuple[tuple[float, int], ...]:
        return tuple((float(s), int(z)) for s, z in t.tolist())

    pool = blob["act_pool"].tolist()
    return ConvertedWeights(
        state_dict=blob["state_dict"],
        activation_quantization=ActivationQuantization(
            convs=pairs(blob["act_convs"]), adds=pairs(blob["act_adds"]), pool=(float(pool[0]), int(pool[1]))
        ),
    )


def load_converted(path: str | Path, *, cache_dir: str | Path | None = None) -> ConvertedWeights:
    """The converted weights for ``path``: the verified cache entry, else converted (and cached).

    The cache file is ``<cache_dir>/mobilenet_v2_tflite-<sha256 of the source>-v2.pt`` beside its sidecar
    ``...pt.sha256`` (the entry's SHA-256), both written atomically, so a changed source file can never be
    served a stale conversion and a damaged entry is rebuilt, never loaded.

    Args:
        path: the ``.tflite`` file.
        cache_dir: cache directory (default :func:`fedfer.agent.files.cache_dir`).

    Returns:
        See :func:`convert_tflite`.
    """
    source = Path(path)
    if not source.is_file():
        raise WeightsError(f"TFLite model not found: {source}")
    digest = sha256_file(source)
    directory = Path(cache_dir) if cache_dir is not None else files_cache_dir()
    cached = directory / f"mobilenet_v2_tflite-{digest}-{_CACHE_FORMAT}.pt"
    sidecar = cached.with_name(cached.name + ".sha256")
    if cached.is_file():
        try:
            return _load_verified(cached, sidecar)
        except Exception:  # unverified or unreadable entry: every failure means "convert again"
            _log.warning("converted-weight cache entry %s failed verification; converting again", cached.name)
    converted = convert_tflite(source)
    directory.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(_to_cache(converted), buffer)
    entry = buffer.getvalue()
    write_atomic(cached, entry)
    write_atomic(sidecar, (hashlib.sha256(entry).hexdigest() + "\n").encode("ascii"))
    return converted


def _load_verified(cached: Path, sidecar: Path) -> ConvertedWeights:
    """Load a cache entry whose SHA-256 matches its sidecar's (raises otherwise)."""
    verify_sha256(cached, sidecar.read_text(encoding="ascii").strip())
    return _from_cache(torch.load(cached, map_location="cpu", weights_only=True))
