"""Canonical serialization of a model as named float32 arrays, with a SHA-256 digest.

Used by the aggregator's model registry to store versions of ``v`` and by the agent to check a downloaded
central model before loading it: both sides compute the same digest over the same bytes.

Format ``fedfer-model/v1``:

* manifest: JSON list of ``{"dtype": "float32", "name": ..., "shape": [...]}`` sorted by name, written with
  sorted keys and no whitespace (so it has exactly one encoding);
* blob: the arrays' little-endian, C-order float32 bytes, concatenated in manifest order;
* digest: lower-case hex SHA-256 of ``"fedfer-model/v1\\0" || len(manifest) as 8 bytes big-endian ||
  manifest || blob``.
"""

from __future__ import annotations

import hmac
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives import hashes

from fedfer.security.errors import IntegrityError, ValidationError

__all__ = [
    "MAX_MODEL_BYTES",
    "EncodedModel",
    "decode_model",
    "encode_model",
    "manifest_layout",
    "model_digest",
]

MAX_MODEL_BYTES = 256 * 1024 * 1024
"""Default upper bound on a model's array bytes."""

_LABEL = b"fedfer-model/v1\x00"
_NAME = re.compile(r"[A-Za-z0-9_.\-/]{1,200}")
_MAX_ARRAYS = 4096
_MAX_MANIFEST = 1024 * 1024
_LE_F32 = np.dtype("<f4")


@dataclass(frozen=True)
class EncodedModel:
    """A model in canonical form.

    Attributes:
        manifest: Canonical manifest JSON text.
        blob: Concatenated array bytes.
        digest: Lower-case hex SHA-256 binding manifest and blob.
    """

    manifest: str
    blob: bytes = field(repr=False)
    digest: str


def model_digest(manifest: str, blob: bytes) -> str:
    """Return the hex SHA-256 digest of a manifest and blob (see the module docstring)."""
    data = manifest.encode("utf-8")
    h = hashes.Hash(hashes.SHA256())
    h.update(_LABEL)
    h.update(len(data).to_bytes(8, "big"))
    h.update(data)
    h.update(blob)
    return h.finalize().hex()


def encode_model(arrays: Mapping[str, npt.NDArray[Any]], *, max_bytes: int = MAX_MODEL_BYTES) -> EncodedModel:
    """Serialize named float32 arrays canonically.

    Raises:
        ValidationError: Not a non-empty mapping of valid names to finite float32 numpy arrays, or too large.
    """
    if not isinstance(arrays, Mapping) or not arrays:
        raise ValidationError("model must be a non-empty mapping of names to arrays")
    if len(arrays) > _MAX_ARRAYS:
        raise ValidationError("model has too many arrays")
    entries: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    total = 0
    for name in sorted(arrays):
        if type(name) is not str or _NAME.fullmatch(name) is None:
            raise ValidationError("array names must match [A-Za-z0-9_./-]{1,200}")
        array = arrays[name]
        if not isinstance(array, np.ndarray) or array.dtype.kind != "f" or array.dtype.itemsize != 4:
            raise ValidationError(f"array {name!r} must be a float32 numpy array")
        if not np.isfinite(array).all():
            raise ValidationError(f"array {name!r} holds NaN or infinity")
        total += array.nbytes
        if total > max_bytes:
            raise ValidationError("model is larger than the allowed size")
        entries.append({"dtype": "float32", "name": name, "shape": [int(d) for d in array.shape]})
        chunks.append(np.ascontiguousarray(array, dtype=_LE_F32).tobytes())
    manifest = json.dumps(entries, sort_keys=True, separators=(",", ":"))
    blob = b"".join(chunks)
    return EncodedModel(manifest=manifest, blob=blob, digest=model_digest(manifest, blob))


def manifest_layout(manifest: str) -> list[tuple[str, tuple[int, ...]]]:
    """The ``(name, shape)`` of each array a canonical manifest lists, in manifest order.

    Raises:
        ValidationError: The manifest is malformed.
    """
    if type(manifest) is not str or len(manifest) > _MAX_MANIFEST:
        raise ValidationError("model manifest must be a JSON string of at most 1 MiB")
    try:
        raw = json.loads(manifest)
    except ValueError as exc:
        raise ValidationError("model manifest is not JSON") from exc
    if type(raw) is not list or not 1 <= len(raw) <= _MAX_ARRAYS:
        raise ValidationError("model manifest must be a non-empty list")
    out: list[tuple[str, tuple[int, ...]]] = []
    for entry in raw:
        if type(entry) is not dict or set(entry) != {"dtype", "name", "shape"}:
            raise ValidationError("model manifest entries must have exactly dtype, name and shape")
        name, shape, dtype = entry["name"], entry["shape"], entry["dtype"]
        if type(name) is not str or _NAME.fullmatch(name) is None or dtype != "float32":
            raise ValidationError("model manifest entry has a bad name or dtype")
        if type(shape) is not list or len(shape) > 8 or any(type(d) is not int or d < 0 for d in shape):
            raise ValidationError("model manifest entry has a bad shape")
        out.append((name, tuple(shape)))
    names = [n for n, _ in out]
    if names != sorted(set(names)):
        raise ValidationError("model manifest names must be unique and sorted")
    return out


def decode_model(
    manifest: str, blob: bytes, digest: str, *, max_bytes: int = MAX_MODEL_BYTES
) -> dict[str, npt.NDArray[np.float32]]:
    """Check a model's digest and return its arrays (read-only views, native float32).

    Raises:
        IntegrityError: The digest does not match manifest and blob (tampered or corrupted).
        ValidationError: The manifest is malformed, sizes disagree, or the model is too large.
    """
    if type(blob) is not bytes or type(digest) is not str:
        raise ValidationError("model blob must be bytes and digest a string")
    if len(blob) > max_bytes:
        raise ValidationError("model is larger than the allowed size")
    expected = model_digest(manifest, blob) if type(manifest) is str else ""
    if not hmac.compare_digest(expected.encode("ascii"), digest.encode("ascii", "replace")):
        raise IntegrityError("model failed its integrity check")
    layout = manifest_layout(manifest)
    arrays: dict[str, npt.NDArray[np.float32]] = {}
    offset = 0
    for name, shape in layout:
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        end = offset + 4 * count
        if end > len(blob):
            raise ValidationError("model blob is shorter than its manifest")
        view = np.frombuffer(blob, dtype=_LE_F32, count=count, offset=offset).reshape(shape)
        arrays[name] = view.astype(np.float32, copy=False)
        offset = end
    if offset != len(blob):
        raise ValidationError("model blob is longer than its manifest")
    return arrays
