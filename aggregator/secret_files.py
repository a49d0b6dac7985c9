"""Files that hold secrets: written atomically with mode 0600, read only if nobody else can read them.

A private key is never visible half-written or with loose permissions: it is written by
:func:`fedfer.security.files.write_atomic` (a fresh 0600 temporary file in the target directory, flushed to
disk, renamed over the target, the directory entry flushed too). Readers refuse key files that group or others
could read (as OpenSSH does).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from fedfer.security.errors import ValidationError
from fedfer.security.files import write_atomic

__all__ = [
    "InsecureFileError",
    "ensure_private_dir",
    "read_secret_file",
    "write_public_file",
    "write_secret_file",
]

_MAX_READ = 16 * 1024 * 1024


class InsecureFileError(ValidationError):
    """A secret file or its directory is accessible to other users."""


def write_secret_file(path: str | os.PathLike[str], data: bytes) -> None:
    """Atomically write ``data`` to ``path`` with mode 0600 (replacing any existing file).

    Raises:
        ValidationError: ``data`` is not bytes or the directory does not exist.
    """
    write_atomic(path, data, mode=0o600)


def write_public_file(path: str | os.PathLike[str], data: bytes) -> None:
    """Atomically write non-secret ``data`` (a certificate, say) to ``path`` with mode 0644."""
    write_atomic(path, data, mode=0o644)


def ensure_private_dir(path: str | os.PathLike[str]) -> Path:
    """Create ``path`` (and parents) if needed and make it 0700; return it.

    Raises:
        InsecureFileError: ``path`` exists but is not a directory owned by the current user.
    """
    directory = Path(path)
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except FileExistsError:
        raise InsecureFileError(f"{directory} exists and is not a directory") from None
    except OSError as exc:
        raise ValidationError(f"cannot create directory {directory}: {exc.strerror}") from None
    info = directory.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
        raise InsecureFileError(f"{directory} is not a directory owned by this user")
    directory.chmod(0o700)
    return directory


def read_secret_file(path: str | os.PathLike[str]) -> bytes:
    """Read a secret file, refusing one that group or others can access or that is a symlink.

    Raises:
        InsecureFileError: The file's mode grants access beyond its owner, or it is not a regular file.
        ValidationError: The file cannot be read or is implausibly large.
    """
    p = Path(path)
    try:
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as exc:
        raise ValidationError(f"cannot read secret file {p}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise InsecureFileError(f"{p} is not a regular file")
        if info.st_mode & 0o077:
            raise InsecureFileError(f"{p} is accessible to other users; run chmod 600 on it")
        if info.st_size > _MAX_READ:
            raise ValidationError(f"{p} is too large for a secret file")
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)
