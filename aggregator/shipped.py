"""The central v the aggregator ships: one trained export per class set, each file pinned by SHA-256.

``fedfer-aggregator init`` publishes :func:`shipped_central_v` as version 1, so the first round starts from a
trained model (FER2013-derived clips through the shipped IFER; see docs/learning.md "Shipped models" for the
commands that reproduce each file). The files are read with numpy only (the aggregator has no torch) and
refused with a :class:`~fedfer.security.errors.ValidationError` naming the file when a digest differs.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from fedfer.security.errors import ValidationError

__all__ = ["RELEASE_DIR", "SHIPPED_V", "ShippedV", "shipped_central_v"]

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
    num_classes: int, *, root: Path = RELEASE_DIR
) -> tuple[dict[str, npt.NDArray[np.float32]], dict[str, Any]]:
    """The shipped central v for ``num_classes`` (4, 6 or 7): named float32 arrays and its manifest.

    Raises:
        ValidationError: no shipped v for that class set, or a file missing, changed or unreadable.
    """
    pinned = SHIPPED_V.get(num_classes)
    if pinned is None:
        raise ValidationError(f"no shipped central v for {num_classes} classes (4, 6 or 7)")
    folder = Path(root) / pinned.folder
    meta = json.loads(_read_pinned(folder / "vfer.json", pinned.manifest_sha256))
    blob = _read_pinned(folder / "vfer.npz", pinned.weights_sha256)
    if meta.get("kind") != "vfer" or len(meta.get("classes", ())) != num_classes:
        raise ValidationError(f"shipped model {pinned.folder} is not a {num_classes}-class v")
    with np.load(io.BytesIO(blob), allow_pickle=False) as data:
        arrays = {name: np.asarray(data[name], dtype=np.float32) for name in data.files}
    return arrays, meta
