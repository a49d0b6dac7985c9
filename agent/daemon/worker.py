"""What every worker process of the daemon shares: the supervisor link, heartbeats, commands, SIGTERM and
the supervisor's death.

A worker's main loop (:meth:`Worker.run`) alternates a bounded amount of work (:meth:`Worker.step`, written
by each role) with the supervisor link: a heartbeat with its state and counters every
``daemon.heartbeat_interval_s``, and commands (``pause``, ``resume``, jobs). On SIGTERM it finishes the step,
drains within its share of ``daemon.drain_timeout_s`` (:attr:`Worker.drain_share`) and exits. A worker whose
supervisor dies exits too (the Linux parent-death signal, :func:`set_parent_death_signal`, plus a parent-pid
check everywhere else). The supervisor hands every worker its configuration in ``run/``:data:`CONFIG_FILE`.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import logging
import os
import queue
import signal
import sys
import time
from pathlib import Path
from typing import Any

import zmq

from fedfer.agent.config import AgentConfig
from fedfer.agent.daemon.wire import decode_link, encode_link, endpoint

__all__ = ["CONFIG_FILE", "Worker", "set_parent_death_signal", "wait_ms"]

_log = logging.getLogger(__name__)

#: The worker configuration the supervisor writes into ``run/`` (JSON, 0600).
CONFIG_FILE = "config.json"


def set_parent_death_signal() -> None:
    """Ask Linux to SIGTERM this process when the supervisor dies (even by ``kill -9``)."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)


class Worker:
    """What every worker shares: the supervisor link, heartbeats, commands, SIGTERM and parent death.

    Subclasses implement :meth:`step` (do a bounded amount of work, return how long they may idle) and
    :meth:`drain` (finish what is queued, release resources).
    """

    role = "worker"
    #: Share of ``daemon.drain_timeout_s`` this worker may spend draining. The supervisor stops workers in
    #: pipeline order, so the shares add up to less than the whole bound.
    drain_share = 0.1

    def __init__(self, *, config: AgentConfig, run_dir: Path, context: zmq.Context[Any]) -> None:
        self.config = config
        self.run_dir = run_dir
        self.context = context
        self.stats: dict[str, Any] = {}
        self.state = "starting"
        self.paused = False
        #: Set when drain left a job thread running: the process must exit without waiting for it.
        self.abandoned = False
        self._stopping = False
        self._parent = os.getppid()
        self._link = context.socket(zmq.DEALER)
        self._link.setsockopt(zmq.IDENTITY, f"{self.role}:{os.getpid()}".encode("ascii"))
        self._link.setsockopt(zmq.LINGER, 500)
        self._link.setsockopt(zmq.SNDHWM, 1000)
        self._link.connect(endpoint(run_dir, "workers"))
        self._next_beat = 0.0
        # Other threads (jobs) never touch a socket: ZeroMQ sockets are not thread-safe. They post here.
        self.outbox: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
        self._unsent: collections.deque[dict[str, Any]] = collections.deque()

    # -- pipeline queues ---------------------------------------------------------------------------
    def queue_in(self, name: str) -> zmq.Socket[Any]:
        """This role's input queue: PULL bound on ``name`` (``daemon.queue_hwm`` messages), no linger."""
        sock: zmq.Socket[Any] = self.context.socket(zmq.PULL)
        sock.setsockopt(zmq.RCVHWM, self.config.daemon.queue_hwm)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(endpoint(self.run_dir, name))
        return sock

    def queue_out(self, name: str, *, linger_ms: int) -> zmq.Socket[Any]:
        """This role's output queue: PUSH connected to ``name``; at close, the queue gets ``linger_ms``."""
        sock: zmq.Socket[Any] = self.context.socket(zmq.PUSH)
        sock.setsockopt(zmq.SNDHWM, self.config.daemon.queue_hwm)
        sock.setsockopt(zmq.LINGER, linger_ms)
        sock.connect(endpoint(self.run_dir, name))
        return sock

    # -- supervisor link --------------------------------------------------------------------------
    def send_event(self, event: dict[str, Any]) -> bool:
        """Send one event to the supervisor (main thread only, never blocking); whether the link took it.

        Heartbeats that do not fit are simply skipped (the next one carries fresher counters); events posted
        to :attr:`outbox` (job results) are kept and sent again until the link takes them.
        """
        event = {"role": self.role, "pid": os.getpid(), **event}
        try:
            self._link.send(encode_link(event), zmq.NOBLOCK)
        except zmq.Again:
            return False
        return True

    def flush_outbox(self) -> None:
        """Send posted events in order; what the link cannot take now stays queued for the next call."""
        while not self.outbox.empty():
            self._unsent.append(self.outbox.get_nowait())
        while self._unsent and self.send_event(self._unsent[0]):
            self._unsent.popleft()

    def heartbeat(self, *, force: bool = False) -> None:
        """Send a heartbeat with this worker's state and counters when one is due."""
        now = time.monotonic()
        if force or now >= self._next_beat:
            self.send_event({"type": "heartbeat", "state": self.state, "stats": dict(self.stats)})
            self._next_beat = now + self.config.daemon.heartbeat_interval_s

    def _poll_commands(self) -> None:
        while self._link.poll(0, zmq.POLLIN):
            command = decode_link(self._link.recv())
            if command is not None:
                self.on_command(command)

    def on_command(self, command: dict[str, Any]) -> None:
        """Handle a supervisor command (``pause``, ``resume``; subclasses add more)."""
        kind = command.get("type")
        if kind == "pause":
            self.paused = True
        elif kind == "resume":
            self.paused = False

    # -- lifecycle ------------------------------------------------------------------------------
    def request_stop(self, *_: object) -> None:
        """Signal handler: finish the current step, drain and exit."""
        self._stopping = True

    def step(self) -> float:
        """Do a bounded amount of work; return the seconds the loop may wait for commands before the next."""
        raise NotImplementedError

    def drain(self, deadline: float) -> None:
        """Finish queued work before ``deadline`` (monotonic) and release resources."""

    def close(self) -> None:
        """Close this worker's sockets."""
        self._link.close()

    def run(self) -> int:
        """The worker's main loop; returns the process exit status."""
        self.send_event({"type": "hello"})
        self.heartbeat(force=True)
        while not self._stopping:
            if os.getppid() != self._parent:
                _log.warning("supervisor is gone; stopping")
                break
            idle = self.step()
            self.flush_outbox()
            self.heartbeat()
            wait_ms = int(max(0.0, min(idle, self.config.daemon.heartbeat_interval_s)) * 1000)
            if self._link.poll(wait_ms, zmq.POLLIN):
                self._poll_commands()
        self.state = "draining"
        self.heartbeat(force=True)
        self.drain(time.monotonic() + self.config.daemon.drain_timeout_s * self.drain_share)
        self.state = "stopped"
        self.flush_outbox()
        self.heartbeat(force=True)
        self.close()
        return 0


def wait_ms(config: AgentConfig) -> int:
    """The bounded wait for room in a full queue: half a heartbeat interval, at most 2 s."""
    return int(min(2.0, config.daemon.heartbeat_interval_s / 2) * 1000)
