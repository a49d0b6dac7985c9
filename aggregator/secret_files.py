"""Files that hold secrets: written atomically with mode 0600, read only if nobody else can read them.

A private key is never visible half-written or with loose permissions: the data goes to a fresh 0600
temporary file in the target directory, is flushed to disk, then renamed over the target, and the directory
entry is flushed too. Readers refuse key files that group or others could read (as OpenSSH does).
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

from fedfer.security.errors import ValidationError

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


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, data: bytes, mode: int) -> None:
    if not isinstance(data, bytes):
        raise ValidationError("file contents must be bytes")
    path = Path(path)
    directory = path.parent
    if not directory.is_dir():
        raise ValidationError(f"directory {directory} does not exist")
    tmp = directory / f".{path.name}.{os.urandom(6).hex()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
    try:
        os.fchmod(fd, mode)  # the umask may have narrowed it; make it exactly `mode`
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    os.close(fd)
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    _fsync_dir(directory)


def write_secret_file(path: str | os.PathLike[str], data: bytes) -> None:
    """Atomically write ``data`` to ``path`` with mode 0600 (replacing any existing file).

    Raises:
        ValidationError: ``data`` is not bytes or the directory does not exist.
    """
    _atomic_write(Path(path), data, 0o600)


def write_public_file(path: str | os.PathLike[str], data: bytes) -> None:
    """Atomically write non-secret ``data`` (a certificate, say) to ``path`` with mode 0644."""
    _atomic_write(Path(path), data, 0o644)


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
