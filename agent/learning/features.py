"""Content-addressed caching of computed arrays (features, activations, trained models).

Everything expensive is stored under the cache dir (``$FEDFER_CACHE``, default ``~/.cache/fedfer``), keyed by
a SHA-256 over *what it was computed from* (file contents, model weights, settings), so a changed input can
never be served a stale result and repeated runs are cheap. Never inside the repository.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from fedfer.agent.learning.errors import DatasetError
from fedfer.agent.learning.export import atomic_write
from fedfer.agent.paths import cache_dir

__all__ = ["cache_dir", "cached_arrays", "content_key", "files_digest", "state_digest"]


def content_key(*parts: bytes | str) -> str:
    """SHA-256 hex over length-prefixed parts (unambiguous: ``("ab","c") != ("a","bc")``)."""
    h = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else bytes(part)
        h.update(len(data).to_bytes(8, "big"))
        h.update(data)
    return h.hexdigest()


def files_digest(paths: Iterable[Path], labels: Iterable[int] | None = None) -> str:
    """SHA-256 over the contents of ``paths`` in order (and their labels if given)."""
    h = hashlib.sha256()
    label_list = list(labels) if labels is not None else None
    for i, p in enumerate(paths):
        try:
            h.update(hashlib.sha256(Path(p).read_bytes()).digest())
        except OSError as exc:
            raise DatasetError(f"cannot read {Path(p).name}") from exc
        if label_list is not None:
            h.update(label_list[i].to_bytes(2, "big"))
    return h.hexdigest()


def state_digest(arrays: dict[str, np.ndarray]) -> str:
    """SHA-256 over named arrays (names, dtypes, shapes and bytes), e.g. a model's weights."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        arr = np.ascontiguousarray(arrays[name])
        h.update(content_key(name, str(arr.dtype), repr(arr.shape)).encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def cached_arrays(
    key: str, compute: Callable[[], dict[str, np.ndarray]], *, sub: str = "arrays"
) -> dict[str, np.ndarray]:
    """Load the arrays stored under ``key``, or compute, store (atomically) and return them.

    Args:
        key: a content key from :func:`content_key`.
        compute: produces the arrays when they are not cached.
        sub: cache sub-folder.
    """
    if len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
        raise DatasetError("cache key must be a SHA-256 hex digest")
    folder = cache_dir(sub)
    path = folder / f"{key}.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    arrays = compute()
    buf = io.BytesIO()
    savez: Any = np.savez  # numpy's stub cannot type **arrays
    savez(buf, **arrays)
    atomic_write(path, buf.getvalue())
    return arrays
