"""The central v the aggregator ships: one trained export per class set, each file pinned by SHA-256.

``fedfer-aggregator init`` publishes :func:`shipped_central_v` as version 1, so the first round starts from a
trained model (FER2013-derived clips through the shipped IFER; see docs/learning.md "Shipped models" for the
commands that reproduce each file). The files are read with numpy only (the aggregator has no torch) and
refused with a :class:`~fedfer.security.errors.ValidationError` naming the file when a digest differs.

:func:`initial_central_v` is what ``init --initial-model`` chooses between: the shipped v, a fixed-seed
random v of the same names and shapes (:func:`random_central_v`, only when asked for), or none.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from fedfer.security.errors import ValidationError

__all__ = [
    "INITIAL_MODELS",
    "RELEASE_DIR",
    "SHIPPED_V",
    "InitialModel",
    "ShippedV",
    "initial_central_v",
    "random_central_v",
    "shipped_central_v",
    "shipped_origin",
]

#: The folder of shipped models inside the installed package.
RELEASE_DIR = Path(__file__).resolve().parent / "release"


@dataclass(frozen=True, slots=True)
class ShippedV:
    """One shipped central v: its folder below :data:`RELEASE_DIR` and the pinned SHA-256 of its two files."""

    folder: str
    manifest_sha256: str
    weights_sha256: str


#: Per class set: the central v trained by ``fedfer-agent train-vfer --corpus fer2013 --classes K --float16``.
SHIPPED_V: dict[int, ShippedV] = {
    4: ShippedV(
        "vfer-4",
        "0637b5b99833f1f192446a6e5ea2e1103ba5bb1de79c3226521d721a3d964cb7",
        "c51e4a82e7f7ae5ee7cc3f67cb717e9568c278af1409127a6e94299b4e076e38",
    ),
    6: ShippedV(
        "vfer-6",
        "ac38178b963c81f4bb034ab6fd915b80e0cdbbbc695df87590d2021115708172",
        "f6751dd9e3392ef5d8ff634dd36c5e8767f760c7df15b41a55c60d8086a54144",
    ),
    7: ShippedV(
        "vfer-7",
        "93f2b0904572717afccbf1451b6c8681cabdffada497ab14ab2e2059063e35ec",
        "2b27e737750dd1c5e2249a5ca455092c8bbec4aaf995c5630066f0f4399881a9",
    ),
}


def _read_pinned(path: Path, sha256: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValidationError(
            f"shipped model file missing or unreadable: {path.parent.name}/{path.name}"
        ) from exc
    if not hmac.compare_digest(hashlib.sha256(data).hexdigest(), sha256):
        raise ValidationError(
            f"shipped model file {path.parent.name}/{path.name} does not match its pinned SHA-256; refused"
        )
    return data


def shipped_central_v(
    num_classes: int, *, root: Path | None = None
) -> tuple[dict[str, npt.NDArray[np.float32]], dict[str, Any]]:
    """The shipped central v for ``num_classes`` (4, 6 or 7): named float32 arrays and its manifest.

    ``root`` is the folder holding ``vfer-K/`` (default: :data:`RELEASE_DIR`, read at call time).

    Raises:
        ValidationError: no shipped v for that class set, or a file missing, changed or unreadable.
    """
    pinned = SHIPPED_V.get(num_classes)
    if pinned is None:
        raise ValidationError(f"no shipped central v for {num_classes} classes (4, 6 or 7)")
    folder = Path(RELEASE_DIR if root is None else root) / pinned.folder
    meta = json.loads(_read_pinned(folder / "vfer.json", pinned.manifest_sha256))
    blob = _read_pinned(folder / "vfer.npz", pinned.weights_sha256)
    if meta.get("kind") != "vfer" or len(meta.get("classes", ())) != num_classes:
        raise ValidationError(f"shipped model {pinned.folder} is not a {num_classes}-class v")
    with np.load(io.BytesIO(blob), allow_pickle=False) as data:
        arrays = {name: np.asarray(data[name], dtype=np.float32) for name in data.files}
    return arrays, meta


def shipped_origin(num_classes: int) -> str:
    """The registry origin of the shipped v for ``num_classes``: ``shipped:vfer-K@<weights SHA-256 prefix>``.

    Raises:
        ValidationError: no shipped v for that class set.
    """
    pinned = SHIPPED_V.get(num_classes)
    if pinned is None:
        raise ValidationError(f"no shipped central v for {num_classes} classes (4, 6 or 7)")
    return f"shipped:{pinned.folder}@{pinned.weights_sha256[:12]}"


# PyTorch's nn.LSTM parameter names: <module>.{weight,bias}_{ih,hh}_l<layer>[_reverse].
_LSTM_NAME = re.compile(r"(?P<module>.+)\.(?:weight|bias)_(?:ih|hh)_l(?P<layer>\d+)(?P<reverse>_reverse)?")


def _default_init_bound(name: str, shapes: dict[str, tuple[int, ...]]) -> float:
    """The half-width of PyTorch's default uniform init for the array ``name`` of the video model."""
    lstm = _LSTM_NAME.fullmatch(name)
    if lstm is not None:  # nn.LSTM: every weight and bias ~ U(-1/sqrt(hidden), 1/sqrt(hidden))
        hh = shapes.get(f"{lstm['module']}.weight_hh_l{lstm['layer']}{lstm['reverse'] or ''}", ())
        fan = hh[1] if len(hh) == 2 else 0
    else:  # nn.Linear: weight (kaiming_uniform, a=sqrt(5)) and bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        module, _, kind = name.rpartition(".")
        weight = shapes.get(f"{module}.weight", ()) if kind in ("weight", "bias") else ()
        fan = weight[1] if len(weight) == 2 else 0
    if fan <= 0:
        raise ValidationError(f"no default initialisation is known for the array {name!r}")
    return 1.0 / math.sqrt(fan)


def random_central_v(
    num_classes: int, *, seed: int, root: Path | None = None
) -> dict[str, npt.NDArray[np.float32]]:
    """A random v for ``num_classes`` classes: PyTorch's default initialisation of the video model, in numpy.

    The names and shapes are those of the shipped v for the class set (read and verified as
    :func:`shipped_central_v` does), so the arrays load into the agents' ``VideoModel``; each array is drawn,
    in name order, by numpy's PCG64 generator seeded with ``seed`` from the distribution PyTorch uses by
    default (``nn.Linear``: weight and bias uniform in +-1/sqrt(fan_in); ``nn.LSTM``: every weight and bias
    uniform in +-1/sqrt(hidden)). The same seed gives the same arrays on every machine; without torch
    (the aggregator's base install has none). The values are public (the initial model is sent to every
    device), so a non-cryptographic generator is the right tool.

    Raises:
        ValidationError: no shipped v for that class set, a shipped file missing or changed, or a bad seed.
    """
    if type(seed) is not int or seed < 0:
        raise ValidationError("the seed of a random initial model must be a non-negative int")
    shipped, _ = shipped_central_v(num_classes, root=root)
    shapes = {name: tuple(int(d) for d in array.shape) for name, array in shipped.items()}
    rng = np.random.default_rng(seed)
    out: dict[str, npt.NDArray[np.float32]] = {}
    for name in sorted(shapes):
        bound = _default_init_bound(name, shapes)
        out[name] = rng.uniform(-bound, bound, size=shapes[name]).astype(np.float32)
    return out


#: The choices of ``fedfer-aggregator init --initial-model``.
INITIAL_MODELS = ("shipped", "random", "none")


@dataclass(frozen=True)
class InitialModel:
    """A deployment's first central v and the origin the registry records for it."""

    arrays: dict[str, npt.NDArray[np.float32]] = field(repr=False)
    origin: str


def initial_central_v(
    choice: str, *, num_classes: int, seed: int = 0, root: Path | None = None
) -> InitialModel | None:
    """The first central v of a new deployment: ``"shipped"`` (the trained v for ``num_classes``),
    ``"random"`` (:func:`random_central_v` with ``seed``, origin ``random:seed=N``) or ``"none"`` (None).

    Raises:
        ValidationError: an unknown choice, no shipped v for ``num_classes``, or a shipped file missing or
            changed (the message names the file).
    """
    if choice == "shipped":
        arrays, _ = shipped_central_v(num_classes, root=root)
        return InitialModel(arrays, shipped_origin(num_classes))
    if choice == "random":
        return InitialModel(random_central_v(num_classes, seed=seed, root=root), f"random:seed={seed}")
    if choice == "none":
        if num_classes not in SHIPPED_V:
            raise ValidationError(f"no central v is known for {num_classes} classes (4, 6 or 7)")
        return None
    raise ValidationError(f"initial model must be one of {', '.join(INITIAL_MODELS)}")
