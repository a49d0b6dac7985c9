"""Where the agent keeps derived, re-creatable files (converted weights, feature and model caches)."""

from __future__ import annotations

import errno
import os
import secrets
from pathlib import Path

__all__ = ["cache_dir", "is_disk_full", "write_atomic"]


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` means the file system is full (``ENOSPC``; the cache's ``CacheFullError`` is one)."""
    return isinstance(exc, OSError) and exc.errno == errno.ENOSPC


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` atomically: a fresh temporary beside it (``mode``), fsync, rename.

    A failure (a full disk, a killed process) leaves the old file as it was and no temporary behind.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        try:
            os.fchmod(fd, mode)  # the umask can only remove bits; make the mode exact
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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
