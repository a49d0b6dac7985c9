"""Content-addressed caching of computed arrays (features, activations, trained models).

Everything expensive is stored under the cache dir (``$FEDFER_CACHE``, default ``~/.cache/fedfer``), keyed by
a SHA-256 over *what it was computed from* (file contents, model weights, settings), so a changed input can
never be served a stale result and repeated runs are cheap (keys:
:func:`fedfer.agent.models.export.content_key` over :func:`files_digest` and
:func:`fedfer.agent.models.export.state_digest`). Never inside the repository.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from fedfer.agent.errors import DatasetError
from fedfer.agent.files import cache_dir
from fedfer.security.files import write_atomic

__all__ = ["cached_arrays", "files_digest"]


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
    write_atomic(path, buf.getvalue())
    return arrays
