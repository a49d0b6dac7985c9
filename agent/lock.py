"""The agent's private state directory and the lock that keeps a second agent off it.

The state directory (and its ``run/`` sub-directory holding the IPC sockets) must be a real directory owned
by the service user with no group or other access (0700). One agent per state directory: the supervisor
holds an exclusive ``flock`` on ``agent.lock`` for its whole life; the kernel drops it when the process
dies, even by ``kill -9``, so a stale lock can never block a restart.
"""

from __future__ import annotations

import fcntl
import os
import stat
from pathlib import Path
from types import TracebackType

from security.errors import FedferError

__all__ = ["AgentLockedError", "InsecurePathError", "StateDirLock", "ensure_private_dir"]

LOCK_NAME = "agent.lock"


class AgentLockedError(FedferError):
    """Another agent already runs on this state directory."""


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


class StateDirLock:
    """An exclusive, non-blocking ``flock`` on ``<state_dir>/agent.lock``.

    Use as a context manager, or call :meth:`acquire` and :meth:`release`. The lock file records the
    holder's pid only so the refusal message can name it.
    """

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock.

        Raises:
            AgentLockedError: another process holds it.
        """
        if self._fd is not None:
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise AgentLockedError(
                f"another fedfer agent (pid {holder}) is already running on state directory "
                f"{self.path.parent}"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        self._fd = fd

    def release(self) -> None:
        """Drop the lock (idempotent)."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> StateDirLock:
        self.acquire()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()
