"""Where the agent's files are: the asset folder and the model files in it, the cache of derived files,
private directories; and the one test for a full disk.

Model files are named by their path below the asset folder (``FEDFER_ASSETS``, laid out like ``../shared``):
:data:`DETECTOR_MODEL` and :data:`MOBILENET_TFLITE` are the defaults of the configuration, the command line
and the benchmarks. Derived, re-creatable files (converted weights, feature and model caches) live under
:func:`cache_dir`, never in the repository. Files are written through
:func:`fedfer.security.files.write_atomic`.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from fedfer.security.errors import FedferError

__all__ = [
    "DETECTOR_MODEL",
    "MOBILENET_TFLITE",
    "InsecurePathError",
    "assets_dir",
    "cache_dir",
    "ensure_private_dir",
    "is_disk_full",
]

#: MediaPipe's BlazeFace short-range face detector, below the asset folder.
DETECTOR_MODEL = "models/mediapipe/face_detection_short_range.tflite"
#: The quantized TFLite MobileNetV2 (``f``'s default weights), below the asset folder.
MOBILENET_TFLITE = "models/mobilenet_v2_tflite/mobilenet_v2_1.0_224_quant.tflite"


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` means the file system is full (``ENOSPC``; the cache's ``CacheFullError`` is one)."""
    return isinstance(exc, OSError) and exc.errno == errno.ENOSPC


def assets_dir() -> Path:
    """The real-asset folder for entry points: ``$FEDFER_ASSETS``, else ``shared/`` beside the checkout."""
    explicit = os.environ.get("FEDFER_ASSETS")
    return Path(explicit) if explicit else Path(__file__).resolve().parents[2] / "shared"


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


class InsecurePathError(FedferError):
    """A private directory is a symlink, not ours, or reachable by other users."""


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` (mode 0700) if missing and verify it is private.

    Returns:
        ``path``.

    Raises:
        InsecurePathError: ``path`` is a symlink or not a directory, belongs to another user, or grants any
            group/other permission (fix with ``chmod 700``; the agent never widens or silently narrows it).
    """
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise InsecurePathError(f"{path} must be a directory, not a symlink")
    if info.st_uid != os.geteuid():
        raise InsecurePathError(f"{path} is owned by uid {info.st_uid}, not by the service user")
    if info.st_mode & 0o077:
        raise InsecurePathError(
            f"{path} has mode {stat.S_IMODE(info.st_mode):o}; it must be private (chmod 700 {path})"
        )
    return path
