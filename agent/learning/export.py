"""Exported models: named float32 arrays (``.npz``) plus a manifest (``.json``) that pins their SHA-256.

This is the framework-free form the aggregator stores and serves (it never needs torch): the manifest says
what the arrays are (``kind``, class names, architecture settings) and the digest binds it to the weights.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from agent.learning.errors import ModelFileError

__all__ = ["atomic_write", "load_exported", "save_exported"]

_FORMAT = "fedfer-named-arrays/1"


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_exported(
    folder: Path, name: str, arrays: Mapping[str, np.ndarray], manifest: Mapping[str, Any]
) -> Path:
    """Write ``folder/name.npz`` and ``folder/name.json``; returns the manifest path.

    Args:
        folder: output folder (created).
        name: base file name (letters, digits, ``-``, ``_``).
        arrays: parameter name → array (stored as float32).
        manifest: JSON-serializable description (``kind``, ``classes``, ...); ``format``, ``weights`` and
            ``sha256`` are added here.
    """
    if not name or not all(c.isalnum() or c in "-_" for c in name):
        raise ModelFileError("export name must be letters, digits, '-' or '_'")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    savez: Any = np.savez  # numpy's stub cannot type **arrays
    savez(buf, **{k: np.asarray(v, dtype=np.float32) for k, v in arrays.items()})
    blob = buf.getvalue()
    meta = dict(manifest)
    meta.update(
        format=_FORMAT,
        weights=f"{name}.npz",
        sha256=hashlib.sha256(blob).hexdigest(),
        parameters=int(sum(np.asarray(v).size for v in arrays.values())),
    )
    atomic_write(folder / f"{name}.npz", blob)
    manifest_path = folder / f"{name}.json"
    atomic_write(manifest_path, json.dumps(meta, indent=2, sort_keys=True).encode())
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
        meta = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelFileError("cannot read model manifest") from exc
    if (
        not isinstance(meta, dict)
        or meta.get("format") != _FORMAT
        or not isinstance(meta.get("weights"), str)
    ):
        raise ModelFileError("not a fedfer model manifest")
    weights = manifest_path.parent / Path(meta["weights"]).name
    try:
        blob = weights.read_bytes()
    except OSError as exc:
        raise ModelFileError("model weights file is missing") from exc
    if hashlib.sha256(blob).hexdigest() != meta.get("sha256"):
        raise ModelFileError("model weights do not match the manifest digest")
    with np.load(io.BytesIO(blob), allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    return arrays, meta
