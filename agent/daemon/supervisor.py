"""``fedfer-agent run``: the supervisor that starts, watches and stops the worker processes.

* Starts ``learner``, ``vision`` and ``capture`` (:mod:`fedfer.agent.daemon.workers`) as separate processes
  and keeps them alive: a worker that exits or stops heartbeating is killed and restarted after an exponential
  backoff; more than ``daemon.crash_loop_limit`` crashes within ``daemon.crash_loop_window_s`` marks it
  failed.
* Serves the control socket (:mod:`fedfer.agent.daemon.control`); malformed requests get error replies.
* SIGTERM/SIGINT: stops capture first, lets vision and learner drain what is queued, and exits within
  ``daemon.drain_timeout_s`` of the signal (stragglers are killed at the bound), also when the signal
  arrives during a reload; the last log line (``agent stopped``) gives the workers' final counters.
* SIGHUP: reads the configuration file again; a valid one is applied (the supervisor's log settings and the
  control socket's size cap included) by restarting the workers with it, an invalid one is refused and the
  running configuration kept.
* With a finite file source, a restart of vision or the learner restarts capture too, so the file whose
  records were in flight is read again from its start (see :mod:`fedfer.agent.capture.ledger`).
* Holds the state-directory lock for its whole life, and so do the workers (they inherit it): a new
  supervisor cannot start while workers of a killed one still run; it waits for them to exit (they get
  SIGTERM when their supervisor dies) up to twice ``daemon.drain_timeout_s``. Persists the pause flag in
  ``agent-state.json``.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from types import FrameType
from typing import Any

import zmq

from fedfer.agent.capture.sources import file_source
from fedfer.agent.config import AgentConfig, ConfigError, apply_path_overrides, config_to_dict, load_config
from fedfer.agent.daemon.control import ControlError, Request, error_reply, parse_request, run_dir
from fedfer.agent.daemon.lock import StateDirLock
from fedfer.agent.daemon.logs import configure_logging
from fedfer.agent.daemon.preflight import startup_warnings
from fedfer.agent.daemon.wire import ROLES, decode_link, encode_link, endpoint
from fedfer.agent.daemon.worker import CONFIG_FILE
from fedfer.agent.files import is_disk_full
from fedfer.agent.store.device import cache_forget, cache_purge, cache_sessions
from fedfer.security.errors import FedferError
from fedfer.security.files import write_atomic

__all__ = ["STATE_FILE", "Supervisor", "WorkerHandle"]

_log = logging.getLogger(__name__)

STATE_FILE = "agent-state.json"
_TICK_S = 0.1
_MAX_JOBS_KEPT = 20


@dataclasses.dataclass
class WorkerHandle:
    """What the supervisor knows about one worker role."""

    role: str
    proc: subprocess.Popen[bytes] | None = None
    identity: bytes = b""
    started_at: float = 0.0
    last_seen: float = 0.0
    greeted: bool = False
    state: str = "stopped"
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)
    restarts: int = 0
    crashes: collections.deque[float] = dataclasses.field(default_factory=collections.deque)
    next_start: float = 0.0
    failed: bool = False
    last_exit: int | None = None
    #: Stopped on purpose (not a crash): restart at once, without counting it towards the crash loop.
    planned_restart: bool = False

    def summary(self, now: float) -> dict[str, Any]:
        """Status of this worker as plain data."""
        running = self.proc is not None and self.proc.poll() is None
        return {
            "pid": self.proc.pid if running and self.proc is not None else None,
            "state": "failed" if self.failed else (self.state if running else "stopped"),
            "restarts": self.restarts,
            "last_exit": self.last_exit,
            "heartbeat_age_s": round(now - self.last_seen, 3) if running and self.greeted else None,
            "uptime_s": round(now - self.started_at, 3) if running else None,
            "stats": self.stats,
        }


class Supervisor:
    """The agent's supervisor process.

    Args:
        config: the validated configuration with path overrides applied.
        config_path: the file SIGHUP reloads (``None``: reload is refused).
        environ: the environment for path overrides on reload (the entry point passes ``os.environ``).
    """

    def __init__(
        self,
        *,
        config: AgentConfig,
        config_path: Path | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        if not config.agent.state_dir:
            raise ConfigError("agent.state_dir must be resolved before the supervisor starts")
        self.config = config
        self.config_path = config_path
        self._environ = dict(environ or {})
        self.state_dir = config.state_dir
        self.run_dir = self.state_dir / "run"
        self.generation = 1
        self.paused = False
        self.jobs: collections.OrderedDict[str, dict[str, Any]] = collections.OrderedDict()
        self.workers = {role: WorkerHandle(role) for role in ROLES}
        self._lock = StateDirLock(self.state_dir)
        self._signals: set[int] = set()
        self._stop_at: float | None = None
        self._started = time.monotonic()
        self._draining = False
        self._context: zmq.Context[Any] | None = None
        self._control: zmq.Socket[Any] | None = None
        self._router: zmq.Socket[Any] | None = None

    # ------------------------------------------------------------------------------------ lifecycle
    def run(self) -> int:
        """Run until SIGTERM/SIGINT; return the exit status (0 after a clean drain).

        Raises:
            AgentLockedError: another agent runs on the same state directory.
            InsecurePathError: the state or run directory is not private.
        """
        run_dir(self.state_dir)
        self._lock.acquire(wait_s=2 * self.config.daemon.drain_timeout_s)
        try:
            self._load_state()
            self._clean_run_dir()
            self._write_worker_config()
            self._open_sockets()
            self._install_signals()
            _log.info(
                "agent started",
                extra={"generation": self.generation, "drain_timeout_s": self.config.daemon.drain_timeout_s},
            )
            self._warn_about_config()
            self._loop()
            return 0
        finally:
            self._close_sockets()
            self._lock.release()

    def _warn_about_config(self) -> None:
        """Log, once per configuration, what keeps it from doing its job (see ``status`` ``warnings``)."""
        for text in startup_warnings(self.config):
            _log.warning(text)

    def _install_signals(self) -> None:
        def note(signum: int, _frame: FrameType | None) -> None:
            self._signals.add(signum)
            if signum != signal.SIGHUP and self._stop_at is None:
                self._stop_at = time.monotonic()

        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, note)

    def _open_sockets(self) -> None:
        self._context = zmq.Context()
        self._router = self._context.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.LINGER, 0)
        self._router.setsockopt(zmq.RCVHWM, 10_000)
        self._router.bind(endpoint(self.run_dir, "workers"))
        self._control = self._context.socket(zmq.REP)
        self._control.setsockopt(zmq.LINGER, 0)
        self._bind_control()

    def _bind_control(self, *, rebind: bool = False) -> None:
        """Listen on ``run/control.ipc`` (0600) with the configured size cap.

        A hard transport limit well above the checked one: oversized messages still get an error reply,
        absurd ones only cost the sender its connection. A listener copies socket options when it is bound,
        so a new cap takes a new binding.
        """
        assert self._control is not None
        address = endpoint(self.run_dir, "control")
        if rebind:
            self._control.unbind(address)
        self._control.setsockopt(zmq.MAXMSGSIZE, self.config.daemon.control_max_bytes * 4)
        self._control.bind(address)
        os.chmod(self.run_dir / "control.ipc", 0o600)

    def _close_sockets(self) -> None:
        for sock in (self._control, self._router):
            if sock is not None:
                sock.close()
        if self._context is not None:
            self._context.term()
        with contextlib.suppress(FileNotFoundError):
            (self.run_dir / "control.ipc").unlink()

    def _clean_run_dir(self) -> None:
        # Sockets left by a supervisor that was killed: we hold the lock, so nobody else uses them.
        for leftover in self.run_dir.glob("*.ipc"):
            leftover.unlink()

    def _write_worker_config(self) -> None:
        write_atomic(self.run_dir / CONFIG_FILE, json.dumps(config_to_dict(self.config)).encode("utf-8"))

    def _load_state(self) -> None:
        path = self.state_dir / STATE_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return
        except (OSError, ValueError):
            _log.warning("agent state file unreadable; starting with defaults")
            return
        if isinstance(data, dict) and type(data.get("paused")) is bool:
            self.paused = data["paused"]

    def _save_state(self) -> bool:
        """Persist the pause flag; on a full disk it holds until the agent restarts (False is returned)."""
        try:
            write_atomic(self.state_dir / STATE_FILE, json.dumps({"paused": self.paused}).encode("utf-8"))
        except OSError as exc:
            if not is_disk_full(exc):
                raise
            _log.warning("disk full: the pause state is not saved; it applies until the agent restarts")
            return False
        return True

    # ----------------------------------------------------------------------------------- main loop
    def _loop(self) -> None:
        assert self._control is not None and self._router is not None
        poller = zmq.Poller()
        poller.register(self._control, zmq.POLLIN)
        poller.register(self._router, zmq.POLLIN)
        while True:
            ready = dict(poller.poll(int(_TICK_S * 1000)))
            if self._router in ready:
                self._drain_events()
            if self._control in ready:
                self._serve_control()
                # A request can take a while (``sessions`` verifies every record): the heartbeats that came
                # in meanwhile count before the workers are judged by them.
                self._drain_events()
            if self._stop_at is None and signal.SIGHUP in self._signals:
                self._signals.discard(signal.SIGHUP)
                self._reload()
            if self._stop_at is not None:  # checked after a reload too: no worker is started once stopping
                self._shutdown()
                return
            self._watch(time.monotonic())

    def _watch(self, now: float) -> None:
        daemon = self.config.daemon
        for handle in self.workers.values():
            if handle.proc is not None:
                code = handle.proc.poll()
                if code is not None:
                    self._on_exit(handle, code, now)
                    continue
                limit = daemon.heartbeat_timeout_s if handle.greeted else daemon.start_timeout_s
                if now - handle.last_seen > limit:
                    _log.error("worker stopped heartbeating; killing it", extra={"worker": handle.role})
                    handle.proc.kill()
                    handle.proc.wait()
                    self._on_exit(handle, handle.proc.returncode, now)
            elif not handle.failed and now >= handle.next_start:
                self._spawn(handle, now)

    def _spawn(self, handle: WorkerHandle, now: float) -> None:
        argv = [sys.executable, "-m", "fedfer.agent.daemon.workers", "--role", handle.role]
        argv += ["--run-dir", str(self.run_dir), "--supervisor-pid", str(os.getpid())]
        if handle.role == "capture" and self.paused:
            argv.append("--paused")
        # The worker inherits the state-directory lock: it stays held until this agent's last process exits.
        handle.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, close_fds=True, pass_fds=(self._lock.fileno(),)
        )
        handle.started_at = handle.last_seen = now
        handle.greeted = False
        handle.identity = b""
        handle.state = "starting"
        _log.info("worker started", extra={"worker": handle.role, "worker_pid": handle.proc.pid})

    def _on_exit(self, handle: WorkerHandle, code: int, now: float) -> None:
        daemon = self.config.daemon
        handle.proc = None
        handle.last_exit = code
        handle.state = "stopped"
        self._fail_jobs_of(handle.role)
        if handle.role in ("vision", "learner") and file_source(self.config):
            self._restart_capture()
        if handle.planned_restart:
            handle.planned_restart = False
            handle.next_start = now
            handle.restarts += 1
            _log.info("worker restarted", extra={"worker": handle.role, "exit": code})
            return
        while handle.crashes and now - handle.crashes[0] > daemon.crash_loop_window_s:
            handle.crashes.popleft()
        handle.crashes.append(now)
        if len(handle.crashes) > daemon.crash_loop_limit:
            handle.failed = True
            _log.error(
                "worker is crash-looping; giving up on it", extra={"worker": handle.role, "exit": code}
            )
            return
        backoff = min(daemon.restart_backoff_s * 2 ** (len(handle.crashes) - 1), daemon.restart_backoff_max_s)
        handle.next_start = now + backoff
        handle.restarts += 1
        _log.warning(
            "worker exited; restarting", extra={"worker": handle.role, "exit": code, "backoff_s": backoff}
        )

    def _restart_capture(self) -> None:
        """Records of the file being read were in flight in the worker that stopped: read the file again.

        Capture drains (no end marker for the file it stops in, so that file is not marked done) and starts
        again at once; the new reading of the file supersedes what the old one stored.
        """
        capture = self.workers["capture"]
        if capture.proc is None or capture.proc.poll() is not None or capture.planned_restart:
            return
        capture.planned_restart = True
        with contextlib.suppress(ProcessLookupError):
            capture.proc.send_signal(signal.SIGTERM)
        _log.info("restarting capture: a file being read is read again from its start")

    # ------------------------------------------------------------------------------ worker events
    def _drain_events(self) -> None:
        assert self._router is not None
        while self._router.poll(0, zmq.POLLIN):
            frames = self._router.recv_multipart()
            event = decode_link(frames[1]) if len(frames) == 2 else None
            if event is not None:
                self._on_event(frames[0], event)

    def _on_event(self, identity: bytes, event: dict[str, Any]) -> None:
        handle = self.workers.get(str(event.get("role")))
        if handle is None or handle.proc is None or event.get("pid") != handle.proc.pid:
            return  # a worker that has since been replaced
        now = time.monotonic()
        handle.last_seen = now
        kind = event.get("type")
        if kind == "hello":
            handle.greeted = True
            handle.identity = identity
            if handle.role == "capture" and self.paused:
                self._send(handle, {"type": "pause"})
        elif kind == "heartbeat":
            handle.greeted = True
            handle.identity = identity
            handle.state = str(event.get("state", "running"))[:32]
            stats = event.get("stats")
            if isinstance(stats, dict):
                handle.stats = stats
        elif kind == "result":
            job = self.jobs.get(str(event.get("job")))
            if job is not None and job["state"] == "running":
                job["finished"] = time.time()
                if event.get("ok") is True:
                    job.update(state="done", result=event.get("result"))
                else:
                    job.update(state="failed", error=str(event.get("error", "failed"))[:500])

    def _send(self, handle: WorkerHandle, command: dict[str, Any]) -> bool:
        assert self._router is not None
        if not handle.identity:
            return False
        try:
            self._router.send_multipart([handle.identity, encode_link(command)], zmq.NOBLOCK)
        except zmq.ZMQError:
            return False
        return True

    def _fail_jobs_of(self, role: str) -> None:
        if role != "learner":
            return
        for job in self.jobs.values():
            if job["state"] == "running":
                job["state"] = "failed"
                job["error"] = "the learner worker stopped"

    # ----------------------------------------------------------------------------- control plane
    def _serve_control(self) -> None:
        assert self._control is not None
        frames = self._control.recv_multipart()
        try:
            request = parse_request(frames, max_bytes=self.config.daemon.control_max_bytes)
            _log.debug("control request", extra={"cmd": request.cmd})
            result = self._handlers()[request.cmd](request)
            reply = json.dumps({"ok": True, "result": result}, default=str).encode("utf-8")
        except FedferError as exc:
            reply = error_reply(str(exc))
        except Exception as exc:  # the control plane must survive any bug in a component it calls
            _log.exception("control request failed", extra={"error_type": type(exc).__name__})
            reply = error_reply(f"internal error ({type(exc).__name__})")
        self._control.send(reply)

    def _handlers(self) -> dict[str, Callable[[Request], dict[str, Any]]]:
        return {
            "status": lambda _r: self.status(),
            "pause": lambda _r: self._set_paused(True),
            "resume": lambda _r: self._set_paused(False),
            "sessions": lambda _r: {"sessions": cache_sessions(self.config)},
            "forget": lambda r: cache_forget(self.config, r.args["id"]),
            "purge": lambda _r: cache_purge(self.config),
            "personalize": lambda _r: self._start_job("personalize"),
            "join": lambda _r: self._start_job("join"),
        }

    def status(self) -> dict[str, Any]:
        """The agent's status: workers, counters, drops, jobs, configuration generation."""
        now = time.monotonic()
        workers = {role: handle.summary(now) for role, handle in self.workers.items()}
        drops = {
            "frames": int(self.workers["capture"].stats.get("frames_dropped", 0)),
            "records": int(self.workers["vision"].stats.get("records_dropped", 0)),
            "disk_full": int(self.workers["learner"].stats.get("records_disk_full", 0)),
        }
        return {
            "pid": os.getpid(),
            "state_dir": str(self.state_dir),
            "uptime_s": round(now - self._started, 3),
            "paused": self.paused,
            "draining": self._draining,
            "config_generation": self.generation,
            "config_digest": self._digest(self.config),
            "capture": {"fps": self.config.capture.fps},
            "workers": workers,
            "drops": drops,
            "jobs": list(self.jobs.values()),
            "warnings": startup_warnings(self.config),
        }

    def _set_paused(self, paused: bool) -> dict[str, Any]:
        self.paused = paused
        saved = self._save_state()
        capture = self.workers["capture"]
        if not paused and capture.failed:
            # An explicit resume gives a capture that gave up (camera unplugged) a fresh start.
            capture.failed = False
            capture.crashes.clear()
            capture.next_start = time.monotonic()
        self._send(self.workers["capture"], {"type": "pause" if paused else "resume"})
        _log.info("capture paused" if paused else "capture resumed")
        return {"paused": paused} if saved else {"paused": paused, "saved": False}

    def _start_job(self, kind: str) -> dict[str, Any]:
        learner = self.workers["learner"]
        if learner.proc is None or not learner.identity:
            raise ControlError("the learner worker is not running")
        if any(job["state"] == "running" for job in self.jobs.values()):
            raise ControlError("another job is running")
        job_id = uuid.uuid4().hex[:12]
        if not self._send(learner, {"type": "job", "job": job_id, "kind": kind}):
            raise ControlError("the learner worker is not reachable")
        self.jobs[job_id] = {"id": job_id, "kind": kind, "state": "running", "started": time.time()}
        while len(self.jobs) > _MAX_JOBS_KEPT:
            self.jobs.popitem(last=False)
        return {"job": job_id, "kind": kind, "state": "running"}

    # -------------------------------------------------------------------------- reload, shutdown
    @staticmethod
    def _digest(config: AgentConfig) -> str:
        return hashlib.sha256(json.dumps(config_to_dict(config), sort_keys=True).encode()).hexdigest()[:16]

    def _reload(self) -> None:
        if self.config_path is None:
            _log.error("config reload refused: the agent was started without a configuration file")
            return
        try:
            new = apply_path_overrides(load_config(self.config_path), self._environ)
            if new.agent.state_dir != self.config.agent.state_dir:
                raise ConfigError("agent.state_dir cannot change while the agent runs")
        except FedferError as exc:
            _log.error("config reload refused; keeping the running configuration", extra={"reason": str(exc)})
            return
        if self._digest(new) == self._digest(self.config):
            _log.info("config reload: nothing changed")
            return
        old = self.config
        self.config = new
        self.generation += 1
        self._write_worker_config()
        if (new.agent.log_level, new.agent.log_file) != (old.agent.log_level, old.agent.log_file):
            configure_logging(role="supervisor", level=new.agent.log_level, log_file=new.agent.log_file)
        if new.daemon.control_max_bytes != old.daemon.control_max_bytes:
            self._bind_control(rebind=True)
        _log.info("config reloaded; restarting workers", extra={"generation": self.generation})
        self._warn_about_config()
        self._stop_workers(time.monotonic() + self.config.daemon.drain_timeout_s)
        now = time.monotonic()
        for handle in self.workers.values():
            handle.failed = False
            handle.crashes.clear()
            handle.next_start = now

    def _stop_deadline(self) -> float | None:
        """When all must be stopped: the drain bound after SIGTERM/SIGINT, less a margin for exiting."""
        if self._stop_at is None:
            return None
        bound = self.config.daemon.drain_timeout_s
        # Leave part of the bound for stragglers to die, closing sockets and the interpreter's exit.
        return self._stop_at + bound - min(1.0, 0.2 * bound)

    def _stop_workers(self, deadline: float) -> None:
        """SIGTERM the workers in pipeline order (capture first), each drains; SIGKILL at ``deadline``.

        A SIGTERM that arrives meanwhile (during a reload) moves the deadline forward to its own bound.
        """
        for role in reversed(ROLES):
            handle = self.workers[role]
            if handle.proc is None:
                continue
            with contextlib.suppress(ProcessLookupError):
                handle.proc.send_signal(signal.SIGTERM)
            while handle.proc.poll() is None:
                stop = self._stop_deadline()
                if time.monotonic() >= (deadline if stop is None else min(deadline, stop)):
                    break
                if self._router is not None and self._router.poll(20, zmq.POLLIN):
                    self._drain_events()
            if handle.proc.poll() is None:
                _log.warning("worker did not drain in time; killing it", extra={"worker": role})
                handle.proc.kill()
                handle.proc.wait()
            elif self._router is not None:
                # Its last heartbeat (final counters) left just before it exited.
                while self._router.poll(50, zmq.POLLIN):
                    self._drain_events()
            handle.last_exit = handle.proc.returncode
            handle.proc = None
            handle.state = "stopped"
            handle.planned_restart = False
            self._fail_jobs_of(role)

    def _shutdown(self) -> None:
        self._draining = True
        if self._stop_at is None:
            self._stop_at = time.monotonic()
        _log.info("draining workers", extra={"drain_timeout_s": self.config.daemon.drain_timeout_s})
        deadline = self._stop_deadline()
        assert deadline is not None
        self._stop_workers(deadline)
        _log.info("agent stopped", extra=self._final_counters())

    def _final_counters(self) -> dict[str, int | None]:
        """The drain's account from the workers' last heartbeats (counters of the last process of each role).

        Frame counters are named by stage (log fields named "frame..." are redacted):
        ``vision_unprocessed`` counts frames capture queued that vision did not receive, ``records_unstored``
        records vision sent that the learner did not receive. Both are 0 after a complete drain, and ``None``
        when the receiving worker was restarted after the sender started (the counters then overlap).
        """
        capture, vision, learner = (self.workers[r].stats for r in ("capture", "vision", "learner"))

        def count(stats: dict[str, Any], key: str) -> int:
            value = stats.get(key, 0)
            return int(value) if type(value) is int else 0

        counts = {
            "capture_sent": count(capture, "frames_sent"),
            "capture_dropped": count(capture, "frames_dropped"),
            "vision_received": count(vision, "frames_in"),
            "vision_discarded": count(vision, "frames_discarded"),
            "records_sent": count(vision, "records_sent"),
            "records_dropped": count(vision, "records_dropped"),
            "records_in": count(learner, "records_in"),
            "records_cached": count(learner, "records_cached"),
        }
        # A difference means something only if the receiver ran for the whole life of the sender.
        started = {role: handle.started_at for role, handle in self.workers.items()}
        out: dict[str, int | None] = dict(counts)
        out["vision_unprocessed"] = (
            max(0, counts["capture_sent"] - counts["vision_received"])
            if started["vision"] <= started["capture"]
            else None
        )
        out["records_unstored"] = (
            max(0, counts["records_sent"] - counts["records_in"])
            if started["learner"] <= started["vision"]
            else None
        )
        return out
