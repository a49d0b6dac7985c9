"""The one way fedfer writes a file: atomically and durably, with an exact mode.

Everything else in :mod:`fedfer.security` is pure; this module is its only I/O, kept here because both the
device and the aggregator write secrets (key files, the deployment's CA key) and privacy ledgers, and every
one of them must have the same guarantees. :func:`write_atomic` writes the data to a fresh temporary file
beside the target (created ``O_EXCL``, never following a link, with exactly ``mode`` whatever the umask),
fsyncs it, renames it over the target and fsyncs the directory. A reader sees the old file or the new one,
never a mixture; after a crash or power loss at any point the file is the old one or the new one; a failure (a
full disk, a killed process) leaves the old file as it was and no temporary behind.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from fedfer.security.errors import ValidationError

__all__ = ["fsync_dir", "write_atomic"]


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """Flush ``directory``'s entries to disk (after a file in it was renamed, created or removed)."""
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | os.PathLike[str], data: bytes, *, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` atomically and durably (see the module docstring).

    Args:
        path: the file to write; its directory must exist.
        data: the complete new contents.
        mode: the file's permission bits (0600 by default: most of what fedfer writes is private).

    Raises:
        ValidationError: ``data`` is not bytes or the directory does not exist.
        OSError: the write failed (``ENOSPC`` on a full disk); the old file is unchanged.
    """
    if not isinstance(data, bytes):
        raise ValidationError("file contents must be bytes")
    target = Path(path)
    directory = target.parent
    if not directory.is_dir():
        raise ValidationError(f"directory {directory} does not exist")
    tmp = directory / f".{target.name}.{secrets.token_hex(6)}.tmp"
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
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(directory)
