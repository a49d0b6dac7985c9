"""The lock that keeps a second agent off a state directory.

The state directory (and its ``run/`` sub-directory holding the IPC sockets) must be a real directory owned
by the service user with no group or other access (0700, :func:`fedfer.agent.files.ensure_private_dir`).
One agent per state directory: the supervisor
holds an exclusive ``flock`` on ``agent.lock`` for its whole life and its workers inherit the descriptor, so
the lock is held until the last process of the agent exits; the kernel drops it then, even after ``kill -9``,
so a stale lock can never block a restart for long.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from pathlib import Path
from types import TracebackType

from fedfer.security.errors import FedferError

__all__ = ["LOCK_NAME", "AgentLockedError", "StateDirLock"]

LOCK_NAME = "agent.lock"


class AgentLockedError(FedferError):
    """Another agent already runs on this state directory."""


class StateDirLock:
    """An exclusive, non-blocking ``flock`` on ``<state_dir>/agent.lock``.

    Use as a context manager, or call :meth:`acquire` and :meth:`release`. The lock file records the
    holder's pid, so the refusal message can name it and a new supervisor can tell a running agent (refused
    at once) from the workers of a dead one (waited for).
    """

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self, *, wait_s: float = 0.0) -> None:
        """Take the lock.

        Args:
            wait_s: when the lock is held but the process recorded in the lock file is gone, the holders are
                workers of an agent whose supervisor died (they exit on their own, draining): wait this long
                for them. A lock whose recorded holder runs is refused at once.

        Raises:
            AgentLockedError: another agent holds it (or a dead agent's workers still do after ``wait_s``).
        """
        if self._fd is not None:
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
                orphans = holder.isdigit() and not _pid_alive(int(holder))
                if not orphans or time.monotonic() >= deadline:
                    os.close(fd)
                    raise AgentLockedError(self._refusal(holder, orphans, wait_s)) from None
                time.sleep(0.05)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        self._fd = fd

    def _refusal(self, holder: str, orphans: bool, wait_s: float) -> str:
        if orphans:
            return (
                f"worker processes of a fedfer agent that stopped (pid {holder}) still hold state directory "
                f"{self.path.parent} after {wait_s:g} s; stop them and start again"
            )
        return f"another fedfer agent (pid {holder}) is already running on state directory {self.path.parent}"

    def fileno(self) -> int:
        """The lock's descriptor, for child processes that share the lock (``pass_fds``).

        Raises:
            AgentLockedError: the lock is not held.
        """
        if self._fd is None:
            raise AgentLockedError("the state-directory lock is not held")
        return self._fd

    def release(self) -> None:
        """Close this process's descriptor (idempotent).

        The lock itself is dropped once no process holds the descriptor any more: children that inherited it
        keep the state directory locked until they exit too.
        """
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> StateDirLock:
        self.acquire()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def _pid_alive(pid: int) -> bool:
    """Whether ``pid`` is a running process (a zombie waiting to be reaped counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with (
        contextlib.suppress(OSError, IndexError),
        open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh,
    ):
        return fh.read().rsplit(") ", 1)[1][:1] != "Z"
    return True
