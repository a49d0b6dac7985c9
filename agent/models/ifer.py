"""IFER = g(f(x)), the image expression classifier: its head ``g`` and the network the device runs.

* :class:`IferHead` ``g``: fully connected layers over f's 1,280-d feature (logits).
* :class:`FaceNet`: MobileNetV2 ``f`` (real ImageNet weights) split at block ``split`` into a frozen prefix
  and a trainable suffix, plus ``g``. With ``split=19`` all of ``f`` is frozen (the paper's setting) and only
  ``g`` trains; a smaller split also fine-tunes f's last blocks centrally (:mod:`fedfer.agent.training.ifer`).
* :func:`save_ifer` / :func:`load_ifer`: the IFER export (named arrays and a manifest,
  :mod:`fedfer.agent.models.export`) that central training writes and the device's vision pipeline loads.

Input faces are uint8 grayscale ``(N, H, W)`` or RGB ``(N, H, W, 3)`` of any size; RGB is converted to
grayscale (IFER is trained on grayscale faces) and faces are resized to ``input_size`` (112 by default;
FER2013 faces are only 48x48; the benchmark's recipe uses 64). Inference (:meth:`FaceNet.infer`,
:meth:`FaceNet.fused`) runs a copy with BatchNorm folded into the convolutions, in channels-last layout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedfer.agent.errors import DatasetError, ModelFileError
from fedfer.agent.models.export import content_key, load_exported, save_exported, state_digest
from fedfer.agent.models.extractor import load_feature_extractor
from fedfer.agent.models.mobilenet import MobileNetV2, Normalization, fold_batchnorm
from fedfer.agent.models.views import (
    PLAIN,
    Framing,
    View,
    framing_from_manifest,
    render_views,
    views_from_manifest,
)
from fedfer.agent.records import CLASS_SETS, FEATURE_DIM, check_num_classes

__all__ = ["NUM_BLOCKS", "FaceNet", "IferHead", "load_backbone", "load_ifer", "save_ifer"]

NUM_BLOCKS = 19  # len(MobileNetV2.features)


class IferHead(nn.Module):
    """``g``: fully connected layers + softmax over f's 1,280-d output (logits from ``forward``)."""

    def __init__(self, *, num_classes: int, hidden: int = 512, dropout: float = 0.3) -> None:
        check_num_classes(num_classes)
        super().__init__()
        self.num_classes = num_classes
        self.net = nn.Sequential(
            nn.Linear(FEATURE_DIM, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, K)`` for features ``(N, 1280)``."""
        return self.net(features)  # type: ignore[no-any-return]


def load_backbone(weights: Path) -> tuple[MobileNetV2, Normalization]:
    """Real ImageNet MobileNetV2 and its input normalization from a weight file (TFLite or torchvision).

    Uses :func:`fedfer.agent.models.extractor.load_feature_extractor`, which pins the architecture variant to
    the file.
    """
    extractor = load_feature_extractor(weights, channels_last=False)
    model = extractor.model
    for p in model.parameters():
        p.requires_grad_(True)
    return model, extractor.normalization


class FaceNet(nn.Module):
    """``g(f(x))`` with f split into a frozen prefix and a trainable suffix.

    Args:
        backbone: MobileNetV2 with real weights (owned from now on).
        normalization: the input normalization of those weights.
        num_classes: 4, 6 or 7.
        input_size: side of the square network input (faces are resized to it).
        split: index of the first trainable block of ``backbone.features`` (19 = all of f frozen).
        hidden: width of g's hidden layer.
    """

    def __init__(
        self,
        *,
        backbone: MobileNetV2,
        normalization: Normalization,
        num_classes: int,
        input_size: int = 112,
        split: int = 14,
        hidden: int = 512,
    ) -> None:
        if not isinstance(backbone, MobileNetV2):
            raise ModelFileError("backbone must be a MobileNetV2")
        if type(input_size) is not int or not 32 <= input_size <= 448 or input_size % 16:
            raise ModelFileError("input_size must be a multiple of 16 in [32, 448]")
        if type(split) is not int or not 1 <= split <= NUM_BLOCKS:
            raise ModelFileError(f"split must be an int in [1, {NUM_BLOCKS}]")
        super().__init__()
        self.num_classes = num_classes
        self.classes = CLASS_SETS.get(num_classes, ())
        self.input_size = input_size
        self.split = split
        self.normalization = normalization
        self.tf_padding = backbone.tf_padding
        self.backbone = backbone
        self.head = IferHead(num_classes=num_classes, hidden=hidden)
        self.hidden = hidden
        std = torch.tensor(normalization.std, dtype=torch.float32)
        mean = torch.tensor(normalization.mean, dtype=torch.float32)
        # CPU-only constants (not buffers: they never travel and are no part of the state dict).
        self._scale = (1.0 / (255.0 * std)).view(1, 3, 1, 1)
        self._shift = (-mean / std).view(1, 3, 1, 1)
        #: The crop the network expects around a detected face (``None``: the device's configured margin).
        self.framing: Framing | None = None
        #: Test-time views whose mean feature the device computes (one plain view unless the export says).
        self.views: tuple[View, ...] = PLAIN
        # Set by reparametrize_batchnorm: the suffix's BatchNorm layers then use batch statistics in training.
        self.suffix_batchnorm_trains = False
        for p in self.prefix_parameters():
            p.requires_grad_(False)

    # -- structure ---------------------------------------------------------------------------------------
    def _blocks(self, start: int, stop: int) -> list[nn.Module]:
        return list(self.backbone.features)[start:stop]

    def prefix_parameters(self) -> list[nn.Parameter]:
        """Parameters of the frozen blocks."""
        return [p for m in self._blocks(0, self.split) for p in m.parameters()]

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters that training updates: f's suffix blocks and g."""
        suffix = [p for m in self._blocks(self.split, NUM_BLOCKS) for p in m.parameters()]
        return suffix + list(self.head.parameters())

    def _suffix_batchnorms(self) -> list[nn.BatchNorm2d]:
        return [
            m
            for block in self._blocks(self.split, NUM_BLOCKS)
            for m in block.modules()
            if isinstance(m, nn.BatchNorm2d)
        ]

    def train(self, mode: bool = True) -> FaceNet:
        """Train mode for g and the suffix; the prefix stays in eval mode, and so does every BatchNorm unless
        :meth:`reparametrize_batchnorm` gave the suffix's BatchNorm layers real statistics.

        The TFLite-converted weights have BN folded into the convolutions (identity BN layers: mean 0,
        variance 1); batch statistics would discard exactly that pretrained scale and offset, so identity
        BN layers keep their running statistics (their affine parameters still learn).
        """
        super().train(mode)
        for m in self._blocks(0, self.split):
            m.eval()
        trains = set(map(id, self._suffix_batchnorms())) if self.suffix_batchnorm_trains else set()
        for m in self.backbone.modules():
            if isinstance(m, nn.BatchNorm2d) and id(m) not in trains:
                m.eval()
        return self

    def reparametrize_batchnorm(self, faces: np.ndarray, *, batch_size: int = 128) -> int:
        """Give the suffix's BatchNorm layers the statistics of ``faces`` without changing the function.

        For each BatchNorm in the trainable blocks, the per-channel mean ``mu`` and variance ``var`` of its
        input (the convolution's output) over ``faces`` become its running statistics, and its scale and
        offset are set so that the eval-mode map is exactly the one before (for the converted weights: the
        identity plus the folded bias). Training then normalizes with batch statistics as usual, which
        allows ordinary fine-tuning learning rates. Returns how many layers were re-parametrized.

        Raises:
            DatasetError: no faces.
        """
        if len(faces) == 0:
            raise DatasetError("no faces to calibrate BatchNorm on")
        layers = self._suffix_batchnorms()
        if any(m.running_mean is None or m.running_var is None for m in layers):
            raise ModelFileError("BatchNorm layers without running statistics")
        counts = dict.fromkeys(map(id, layers), 0)
        sums = {id(m): torch.zeros(m.num_features, dtype=torch.float64) for m in layers}
        squares = {id(m): torch.zeros(m.num_features, dtype=torch.float64) for m in layers}

        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            x = inputs[0].double()
            counts[id(module)] += x.shape[0] * x.shape[2] * x.shape[3]
            sums[id(module)] += x.sum(dim=(0, 2, 3))
            squares[id(module)] += (x * x).sum(dim=(0, 2, 3))

        handles = [m.register_forward_pre_hook(hook) for m in layers]
        try:
            self.eval()
            with torch.inference_mode():
                for start in range(0, len(faces), batch_size):
                    self(self.preprocess(faces[start : start + batch_size]))
        finally:
            for h in handles:
                h.remove()
        with torch.no_grad():
            for m in layers:
                mean, var = m.running_mean, m.running_var
                if mean is None or var is None:  # checked above; narrows the type
                    continue
                mu = sums[id(m)] / counts[id(m)]
                new_var = (squares[id(m)] / counts[id(m)] - mu * mu).clamp_min(0.0)
                slope = m.weight.double() / torch.sqrt(var.double() + m.eps)
                # old map: slope * (x - running_mean) + bias; the new (mu, var) give the same line.
                m.bias.copy_(m.bias.double() + slope * (mu - mean.double()))
                m.weight.copy_(slope * torch.sqrt(new_var + m.eps))
                mean.copy_(mu)
                var.copy_(new_var)
        self.suffix_batchnorm_trains = True
        return len(layers)

    # -- inference ---------------------------------------------------------------------------------------
    def preprocess(self, images: np.ndarray) -> torch.Tensor:
        """uint8 faces ``(N, H, W)`` gray or ``(N, H, W, 3)`` RGB → normalized ``(N, 3, S, S)`` (plain view).

        RGB faces are converted to grayscale first: IFER is trained on grayscale faces (FER2013), and the
        device's RGB crops and the clip path's grayscale crops must give the same features. The gray level
        is replicated into the three input channels.
        """
        return self._normalize(render_views(_gray_faces(images), PLAIN, self.input_size))

    def _normalize(self, gray: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(gray).float().unsqueeze(1)
        return x * self._scale + self._shift

    def prefix(self, x: torch.Tensor) -> torch.Tensor:
        """Frozen-prefix activations for normalized input (pooled to 1x1 when all of f is frozen)."""
        h = nn.Sequential(*self._blocks(0, self.split))(x)
        if self.split == NUM_BLOCKS:
            h = F.adaptive_avg_pool2d(h, 1)
        return h  # type: ignore[no-any-return]

    def features_from_prefix(self, h: torch.Tensor) -> torch.Tensor:
        """f's 1,280-d feature from prefix activations."""
        if self.split < NUM_BLOCKS:
            h = nn.Sequential(*self._blocks(self.split, NUM_BLOCKS))(h)
        return torch.flatten(F.adaptive_avg_pool2d(h, 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, K)`` for normalized input ``(N, 3, S, S)``."""
        return self.head(self.features_from_prefix(self.prefix(x)))  # type: ignore[no-any-return]

    def fused(self) -> FaceNet:
        """An inference copy (eval mode, channels-last): every BatchNorm folded into its convolution.

        Same function up to float rounding, one pass fewer per convolution. What the device runs
        (:class:`fedfer.agent.vision.pipeline.ExportedIferModel`) and what :meth:`infer` uses, so v's features
        on the device are those it was trained and personalized on. Not for training or export (no BN layers).
        """
        net = FaceNet(
            backbone=fold_batchnorm(self.backbone),
            normalization=self.normalization,
            num_classes=self.num_classes,
            input_size=self.input_size,
            split=self.split,
            hidden=self.hidden,
        )
        net.head.load_state_dict(self.head.state_dict())
        net.framing, net.views = self.framing, self.views
        return net.eval().to(memory_format=torch.channels_last)  # type: ignore[call-overload,no-any-return]

    def embed(self, images: np.ndarray, *, channels_last: bool = True) -> torch.Tensor:
        """f's features ``(N, 1280)`` of uint8 faces, the mean of f over :attr:`views` (inference mode).

        What the device caches for v (:class:`fedfer.agent.vision.pipeline.ExportedIferModel`) and what
        :meth:`run` gives g.
        """
        n = len(images)
        x = self._normalize(render_views(_gray_faces(images), self.views, self.input_size))
        x = x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()
        f = self.features_from_prefix(self.prefix(x))
        return f.view(n, len(self.views), -1).mean(dim=1) if len(self.views) > 1 else f

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Features ``(N, 1280)`` and probabilities ``(N, K)`` float32 through this module as it is.

        With several :attr:`views`, a face's feature is the mean of f over its views and its probabilities
        are g of that mean. Use on :meth:`fused` copies for speed; :meth:`infer` does both steps for a batch.
        """
        with torch.inference_mode():
            f = self.embed(images)
            p = torch.softmax(self.head(f), dim=1)
            return f.float().numpy().astype(np.float32), p.float().numpy().astype(np.float32)

    def infer(self, images: np.ndarray, *, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
        """Features ``(N, 1280)`` and class probabilities ``(N, K)`` (float32) for uint8 faces.

        Runs a :meth:`fused` copy made for this call (the model itself is left as it is).
        """
        if len(images) == 0:
            return np.zeros((0, FEATURE_DIM), np.float32), np.zeros((0, self.num_classes), np.float32)
        runner = self.fused()
        feats, probs = [], []
        for start in range(0, len(images), batch_size):
            f, p = runner.run(images[start : start + batch_size])
            feats.append(f)
            probs.append(p)
        return np.concatenate(feats), np.concatenate(probs)

    def exported_arrays(self) -> dict[str, np.ndarray]:
        """What ``g(f(x))`` is made of, as named arrays: f's blocks (``f.*``) and g (``g.*``).

        MobileNetV2's ImageNet classifier is no part of f(x) and is left out, so two loads of one export give
        the same arrays (the classifier is re-initialized at random on every load).
        """
        arrays = {
            f"f.{k}": v.detach().cpu().numpy()
            for k, v in self.backbone.state_dict().items()
            if not k.startswith("classifier.")
        }
        arrays.update({f"g.{k}": v.detach().cpu().numpy() for k, v in self.head.state_dict().items()})
        return arrays

    def weights_digest(self) -> str:
        """SHA-256 over :meth:`exported_arrays`: a cache key for anything computed with this model."""
        return state_digest(self.exported_arrays())

    def inference_digest(self) -> str:
        """A cache key for features computed with this model: its weights, framing and views."""
        views = ";".join(repr(v) for v in self.views)
        return content_key("facenet-inference/1", self.weights_digest(), repr(self.framing), views)

    def identity(self) -> str:
        """Content key of the frozen prefix: its weights, input size, split and normalization."""
        prefix_state = {
            k: v.detach().cpu().numpy()
            for k, v in self.backbone.state_dict().items()
            if k.startswith("features.") and int(k.split(".")[1]) < self.split
        }
        return content_key(
            "facenet-prefix/1",
            state_digest(prefix_state),
            str(self.input_size),
            str(self.split),
            repr(self.normalization),
            str(self.tf_padding),
        )


def _gray_faces(images: np.ndarray) -> list[np.ndarray]:
    """uint8 grayscale faces from ``(N, H, W)`` gray or ``(N, H, W, 3)`` RGB (converted).

    Raises:
        DatasetError: any other array.
    """
    import cv2

    arr = np.asarray(images)
    if arr.dtype != np.uint8 or arr.ndim not in (3, 4) or (arr.ndim == 4 and arr.shape[3] != 3):
        raise DatasetError("faces must be uint8 (N, H, W) grayscale or (N, H, W, 3) RGB")
    if arr.ndim == 3:
        return list(arr)
    return [np.asarray(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)) for img in arr]


def save_ifer(
    net: FaceNet,
    folder: Path,
    *,
    name: str = "ifer",
    extra: dict[str, Any] | None = None,
    storage: str = "float32",
) -> Path:
    """Export f (all blocks) and g as named arrays plus a manifest (with the framing and views the net
    states); returns the manifest path. ``storage="float16"`` halves the file (read back as float32)."""
    arrays = net.exported_arrays()
    manifest: dict[str, Any] = {
        "kind": "ifer",
        "classes": list(net.classes),
        "input_size": net.input_size,
        "split": net.split,
        "hidden": net.hidden,
        "tf_padding": net.tf_padding,
        "normalization": {
            "name": net.normalization.name,
            "mean": list(net.normalization.mean),
            "std": list(net.normalization.std),
        },
    }
    if net.framing is not None:
        manifest["framing"] = net.framing.as_dict()
    if net.views != PLAIN:
        manifest["views"] = [v.as_dict() for v in net.views]
    manifest.update(extra or {})
    return save_exported(folder, name, arrays, manifest, storage=storage)


def load_ifer(path: Path) -> FaceNet:
    """Rebuild a :class:`FaceNet` from :func:`save_ifer`'s export (eval mode).

    Raises:
        ModelFileError: not an IFER export, or the arrays do not fit.
    """
    arrays, meta = load_exported(path)
    if meta.get("kind") != "ifer":
        raise ModelFileError("not an IFER model export")
    try:
        norm = meta["normalization"]
        normalization = Normalization(norm["name"], tuple(norm["mean"]), tuple(norm["std"]))
        backbone = MobileNetV2(tf_padding=bool(meta["tf_padding"]))
        f_state = {k[2:]: torch.from_numpy(v) for k, v in arrays.items() if k.startswith("f.")}
        g_state = {k[2:]: torch.from_numpy(v) for k, v in arrays.items() if k.startswith("g.")}
        missing, unexpected = backbone.load_state_dict(f_state, strict=False)
        if unexpected or any(not k.startswith("classifier.") for k in missing):
            raise ModelFileError("IFER export does not fit MobileNetV2")
        net = FaceNet(
            backbone=backbone,
            normalization=normalization,
            num_classes=len(meta["classes"]),
            input_size=int(meta["input_size"]),
            split=int(meta["split"]),
            hidden=int(meta["hidden"]),
        )
        net.head.load_state_dict(g_state, strict=True)
        net.framing = framing_from_manifest(meta)
        net.views = views_from_manifest(meta)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise ModelFileError("IFER export does not fit the model") from exc
    return net.eval()
