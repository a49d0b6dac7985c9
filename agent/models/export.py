"""Exported models: named float32 arrays (``.npz``) plus a manifest (``.json``) that pins their SHA-256.

Arrays may be stored as float16 (``storage="float16"``, recorded in the manifest's ``storage`` field): half
the bytes for a shipped model; they are read back as float32.

This is the framework-free form the aggregator stores and serves (it never needs torch): the manifest says
what the arrays are (``kind``, class names, architecture settings) and the digest binds it to the weights.
The same digests name models by content: :func:`state_digest` over named arrays, :func:`content_key` over
any parts (the keys of :mod:`fedfer.agent.training.cached`).
"""

from __future__ import annotations

import hashlib
import io
import json
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fedfer.agent.errors import ModelFileError
from fedfer.security.files import write_atomic

__all__ = [
    "STORAGE_DTYPES",
    "content_key",
    "load_exported",
    "pack_exported",
    "save_exported",
    "state_digest",
    "unpack_exported",
]

_FORMAT = "fedfer-named-arrays/1"


def content_key(*parts: bytes | str) -> str:
    """SHA-256 hex over length-prefixed parts (unambiguous: ``("ab","c") != ("a","bc")``)."""
    h = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else bytes(part)
        h.update(len(data).to_bytes(8, "big"))
        h.update(data)
    return h.hexdigest()


def state_digest(arrays: Mapping[str, np.ndarray]) -> str:
    """SHA-256 over named arrays (names, dtypes, shapes and bytes), e.g. a model's weights."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        arr = np.ascontiguousarray(arrays[name])
        h.update(content_key(name, str(arr.dtype), repr(arr.shape)).encode())
        h.update(arr.tobytes())
    return h.hexdigest()


#: How arrays may be stored on disk (always float32 in memory).
STORAGE_DTYPES = {"float32": np.float32, "float16": np.float16}


def _npz_bytes(arrays: Mapping[str, np.ndarray], storage: str = "float32") -> bytes:
    if storage not in STORAGE_DTYPES:
        raise ModelFileError(f"storage must be one of {sorted(STORAGE_DTYPES)}")
    dtype = STORAGE_DTYPES[storage]
    buf = io.BytesIO()
    savez: Any = np.savez  # numpy's stub cannot type **arrays
    savez(buf, **{k: np.asarray(v, dtype=np.float32).astype(dtype) for k, v in arrays.items()})
    return buf.getvalue()


def _described(
    name: str, blob: bytes, arrays: Mapping[str, np.ndarray], manifest: Mapping[str, Any]
) -> dict[str, Any]:
    meta = dict(manifest)
    meta.pop("storage", None)
    meta.update(
        format=_FORMAT,
        weights=f"{name}.npz",
        sha256=hashlib.sha256(blob).hexdigest(),
        parameters=int(sum(np.asarray(v).size for v in arrays.values())),
    )
    return meta


def _verified_arrays(blob: bytes, meta: Mapping[str, Any]) -> dict[str, np.ndarray]:
    if hashlib.sha256(blob).hexdigest() != meta.get("sha256"):
        raise ModelFileError("model weights do not match the manifest digest")
    try:
        with np.load(io.BytesIO(blob), allow_pickle=False) as data:
            return {k: np.asarray(data[k], dtype=np.float32) for k in data.files}
    except (OSError, ValueError) as exc:  # pragma: no cover - the digest matched what was written
        raise ModelFileError("model weights are unreadable") from exc


def _check_manifest(meta: Any) -> dict[str, Any]:
    if (
        not isinstance(meta, dict)
        or meta.get("format") != _FORMAT
        or not isinstance(meta.get("weights"), str)
    ):
        raise ModelFileError("not a fedfer model manifest")
    return meta


def save_exported(
    folder: Path,
    name: str,
    arrays: Mapping[str, np.ndarray],
    manifest: Mapping[str, Any],
    *,
    storage: str = "float32",
) -> Path:
    """Write ``folder/name.npz`` and ``folder/name.json``; returns the manifest path.

    Args:
        folder: output folder (created).
        name: base file name (letters, digits, ``-``, ``_``).
        arrays: parameter name → array (stored as float32).
        manifest: JSON-serializable description (``kind``, ``classes``, ...); ``format``, ``weights``,
            ``sha256`` and (for float16) ``storage`` are added here.
        storage: ``float32`` or ``float16`` (:data:`STORAGE_DTYPES`).
    """
    if not name or not all(c.isalnum() or c in "-_" for c in name):
        raise ModelFileError("export name must be letters, digits, '-' or '_'")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    blob = _npz_bytes(arrays, storage)
    meta = _described(name, blob, arrays, manifest)
    if storage != "float32":
        meta["storage"] = storage
    write_atomic(folder / f"{name}.npz", blob)
    manifest_path = folder / f"{name}.json"
    write_atomic(manifest_path, json.dumps(meta, indent=2, sort_keys=True).encode())
    return manifest_path


def load_exported(manifest_path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read an exported model; the weights must match the manifest's SHA-256.

    Raises:
        ModelFileError: missing files, wrong format or a digest mismatch.
    """
    manifest_path = Path(manifest_path)
    if manifest_path.is_dir():
        candidates = sorted(manifest_path.glob("*.json"))
        if len(candidates) != 1:
            raise ModelFileError("model folder must hold exactly one manifest")
        manifest_path = candidates[0]
    try:
        meta = _check_manifest(json.loads(manifest_path.read_text(encoding="utf-8")))
    except (OSError, ValueError) as exc:
        raise ModelFileError("cannot read model manifest") from exc
    weights = manifest_path.parent / Path(meta["weights"]).name
    try:
        blob = weights.read_bytes()
    except OSError as exc:
        raise ModelFileError("model weights file is missing") from exc
    return _verified_arrays(blob, meta), meta


def pack_exported(name: str, arrays: Mapping[str, np.ndarray], manifest: Mapping[str, Any]) -> bytes:
    """The exported model as one byte string (manifest and weights), for storage that is not a folder.

    Layout: a 4-byte big-endian manifest length, the manifest JSON, the ``.npz`` weights.
    """
    blob = _npz_bytes(arrays)
    head = json.dumps(_described(name, blob, arrays, manifest), sort_keys=True).encode()
    return struct.pack(">I", len(head)) + head + blob


def unpack_exported(data: bytes) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read what :func:`pack_exported` wrote; the weights must match the manifest's SHA-256.

    Raises:
        ModelFileError: truncated data, a bad manifest or a digest mismatch.
    """
    if type(data) is not bytes or len(data) < 4:
        raise ModelFileError("packed model is truncated")
    (size,) = struct.unpack(">I", data[:4])
    if len(data) < 4 + size:
        raise ModelFileError("packed model is truncated")
    try:
        meta = _check_manifest(json.loads(data[4 : 4 + size].decode("utf-8")))
    except ValueError as exc:
        raise ModelFileError("packed model has an unreadable manifest") from exc
    return _verified_arrays(data[4 + size :], meta), meta
