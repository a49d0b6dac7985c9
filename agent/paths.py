"""Where the agent keeps derived, re-creatable files (converted weights, feature and model caches)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_dir"]


def cache_dir(sub: str = "") -> Path:
    """The cache folder, created with mode 0700 (never inside the repository).

    ``$FEDFER_CACHE_DIR`` (``$FEDFER_CACHE`` is accepted as an alias), else ``$XDG_CACHE_HOME/fedfer``, else
    ``~/.cache/fedfer``; ``sub`` names a sub-folder.
    """
    explicit = os.environ.get("FEDFER_CACHE_DIR") or os.environ.get("FEDFER_CACHE")
    if explicit:
        base = Path(explicit)
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = (Path(xdg) if xdg else Path.home() / ".cache") / "fedfer"
    path = base / sub if sub else base
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path
