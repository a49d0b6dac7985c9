"""The agent's worker processes: capture, vision and learner, joined by ZeroMQ.

Each worker is its own process (``python -m agent.workers --role ROLE --run-dir DIR``) started by the
supervisor. The wiring, all IPC sockets inside the private ``run/`` directory::

    capture ──PUSH(frames.ipc, HWM, non-blocking: drops counted)──► vision
    vision  ──PUSH(records.ipc, HWM, bounded wait: drops counted)──► learner (writes the encrypted cache)
    every worker ◄──DEALER/ROUTER(workers.ipc)──► supervisor: hello, heartbeats, commands, job results

Frames travel only in RAM. On SIGTERM a worker drains what is already queued (capture stops reading at
once) and exits 0. A worker whose supervisor dies exits too (Linux parent-death signal, plus a parent-pid
check everywhere else). What each stage does is pluggable: :mod:`agent.service` binds the real capture,
vision, cache and learning components.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import logging
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from agent import service
from agent.capture import CaptureError
from agent.config import AgentConfig, config_from_dict
from agent.logs import capture_native_stderr, configure_logging
from security.errors import FedferError

__all__ = [
    "CONFIG_FILE",
    "ROLES",
    "Worker",
    "endpoint",
    "main",
]

_log = logging.getLogger(__name__)

#: Start order (each role binds the socket its upstream connects to); stop order is the reverse.
ROLES = ("learner", "vision", "capture")
CONFIG_FILE = "config.json"
_MAX_HEADER = 4096


def endpoint(run_dir: Path, name: str) -> str:
    """The ZeroMQ IPC endpoint of socket ``name`` in ``run_dir`` (checked against the AF_UNIX path limit)."""
    path = run_dir / f"{name}.ipc"
    if len(os.fsencode(path)) > 100:
        raise FedferError(f"state directory path too long for a local socket: {path}")
    return f"ipc://{path}"


def _set_parent_death_signal() -> None:
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

    # -- supervisor link --------------------------------------------------------------------------
    def send_event(self, event: dict[str, Any]) -> None:
        """Send one event to the supervisor (main thread only; dropped, not blocking, if it is gone)."""
        event = {"role": self.role, "pid": os.getpid(), **event}
        with contextlib.suppress(zmq.Again):
            self._link.send(json.dumps(event, default=str).encode("utf-8"), zmq.NOBLOCK)

    def _flush_outbox(self) -> None:
        while not self.outbox.empty():
            self.send_event(self.outbox.get_nowait())

    def heartbeat(self, *, force: bool = False) -> None:
        """Send a heartbeat with this worker's state and counters when one is due."""
        now = time.monotonic()
        if force or now >= self._next_beat:
            self.send_event({"type": "heartbeat", "state": self.state, "stats": dict(self.stats)})
            self._next_beat = now + self.config.daemon.heartbeat_interval_s

    def _poll_commands(self) -> None:
        while self._link.poll(0, zmq.POLLIN):
            raw = self._link.recv()
            try:
                command = json.loads(raw)
            except ValueError:
                continue
            if isinstance(command, dict):
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
            self._flush_outbox()
            self.heartbeat()
            wait_ms = int(max(0.0, min(idle, self.config.daemon.heartbeat_interval_s)) * 1000)
            if self._link.poll(wait_ms, zmq.POLLIN):
                self._poll_commands()
        self.state = "draining"
        self.heartbeat(force=True)
        self.drain(time.monotonic() + self.config.daemon.drain_timeout_s * self.drain_share)
        self.state = "stopped"
        self._flush_outbox()
        self.heartbeat(force=True)
        self.close()
        return 0


class CaptureWorker(Worker):
    """Reads the video source at the configured rate and pushes frames without ever blocking on vision."""

    role = "capture"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._out = self.context.socket(zmq.PUSH)
        self._out.setsockopt(zmq.SNDHWM, self.config.daemon.queue_hwm)
        self._out.setsockopt(zmq.LINGER, 1000)
        self._out.connect(endpoint(self.run_dir, "frames"))
        self._source: service.FrameSource | None = None
        self._frames: Iterator[service.Frame] | None = None
        self._pending: service.Frame | None = None
        self._started = self._paused_at = time.monotonic()
        self._retry_at = 0.0
        self._failures = 0
        self.stats.update(frames_read=0, frames_sent=0, frames_dropped=0, source_done=False)

    def _open(self) -> Iterator[service.Frame]:
        self._source = service.open_source(self.config)
        self._frames = iter(self._source)
        self._started = time.monotonic()
        return self._frames

    def _release(self) -> None:
        if self._source is not None:
            self._source.close()
        self._source = self._frames = self._pending = None

    def on_command(self, command: dict[str, Any]) -> None:
        """Pause releases a camera or stream (a file keeps its place); resume carries on."""
        was_paused = self.paused
        super().on_command(command)
        if self.paused and not was_paused:
            self._paused_at = time.monotonic()
            source = self.config.capture.source
            if source.startswith("camera:") or "://" in source:
                self._release()
        elif was_paused and not self.paused:
            # Real-time pacing resumes where it stopped instead of bursting the frames "missed" meanwhile.
            self._started += time.monotonic() - self._paused_at

    def step(self) -> float:
        """Read one frame and send it if it is due; a full queue drops the frame (counted)."""
        if self.paused:
            self.state = "paused"
            return 1.0
        if self.stats["source_done"]:
            self.state = "idle"
            return 1.0
        if time.monotonic() < self._retry_at:
            self.state = "waiting"
            return self._retry_at - time.monotonic()
        if self._pending is None:
            try:
                frames = self._frames if self._frames is not None else self._open()
                frame = next(frames, None)
            except CaptureError as exc:  # a misconfigured source (other errors) still ends the worker
                return self._source_failed(exc)
            if frame is None:
                self.stats["source_done"] = True
                self._release()
                return 0.0
            self.stats["frames_read"] += 1
            self._failures = 0
            self._pending = frame
        if self.config.capture.realtime:
            wait = self._started + self._pending.due_s - time.monotonic()
            if wait > 0:
                self.state = "running"
                return wait
        self._send(self._pending)
        self._pending = None
        self.state = "running"
        return 0.0

    def _source_failed(self, exc: CaptureError) -> float:
        """A source failure (vanished file, unplugged camera) is reported; the worker retries with backoff."""
        self._release()
        self._failures += 1
        backoff = float(
            min(
                self.config.daemon.restart_backoff_s * 2 ** (self._failures - 1),
                self.config.daemon.restart_backoff_max_s,
            )
        )
        self._retry_at = time.monotonic() + backoff
        self.stats.update(source_error=str(exc), source_failures=self._failures)
        self.state = "waiting"
        _log.warning("video source failed; retrying", extra={"reason": str(exc), "retry_in_s": backoff})
        return backoff

    def _send(self, frame: service.Frame) -> None:
        header = {
            "segment": frame.segment,
            "ts": frame.timestamp,
            "shape": list(frame.image.shape),
        }
        try:
            self._out.send_multipart(
                [json.dumps(header).encode("utf-8"), np.ascontiguousarray(frame.image).data],
                zmq.NOBLOCK,
                copy=False,
            )
            self.stats["frames_sent"] += 1
        except zmq.Again:
            self.stats["frames_dropped"] += 1

    def drain(self, deadline: float) -> None:
        """Stop reading at once; frames already queued still go out within the socket linger."""
        self._release()

    def close(self) -> None:
        """Close the frame socket and the supervisor link."""
        self._out.close()
        super().close()


class VisionWorker(Worker):
    """Turns frames into face records (no frame ever leaves this process) and cuts them into sessions."""

    role = "vision"
    drain_share = 0.45

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._in = self.context.socket(zmq.PULL)
        self._in.setsockopt(zmq.RCVHWM, self.config.daemon.queue_hwm)
        self._in.setsockopt(zmq.LINGER, 0)
        self._in.bind(endpoint(self.run_dir, "frames"))
        self._out = self.context.socket(zmq.PUSH)
        self._out.setsockopt(zmq.SNDHWM, self.config.daemon.queue_hwm)
        self._out.setsockopt(zmq.SNDTIMEO, 2000)
        self._out.setsockopt(zmq.LINGER, 2000)
        self._out.connect(endpoint(self.run_dir, "records"))
        self.stats.update(frames_in=0, faces=0, records_sent=0, records_dropped=0, sessions=0)
        self._stage: service.VisionStage | None = None
        self._loader: threading.Thread | None = None
        self._sessions = service.SessionCutter(gap_s=self.config.vision.session_gap_s)

    def _load_stage(self) -> None:
        # Runs in a thread: heartbeats, commands and SIGTERM stay responsive while models load.
        try:
            self.stats.update(_limit_torch_threads())
            self._stage = service.open_vision(self.config)
        except service.ComponentUnavailableError as exc:
            self.stats["unavailable"] = str(exc)
            _log.error("vision unavailable; frames are counted and discarded", extra={"reason": str(exc)})

    def step(self) -> float:
        """Process queued frames for at most half a heartbeat interval.

        The models load on the first frame (so a paused or idle agent never pays for them); frames that
        arrive meanwhile wait in the bounded queue, and capture counts what does not fit.
        """
        if self._stage is None and "unavailable" not in self.stats:
            if self._loader is None and self._in.poll(0, zmq.POLLIN):
                self._loader = threading.Thread(target=self._load_stage, name="vision-load", daemon=True)
                self._loader.start()
            self.state = "loading" if self._loader is not None else "waiting"
            return 0.1
        self.state = "running" if self._stage is not None else "unavailable"
        until = time.monotonic() + self.config.daemon.heartbeat_interval_s / 2
        while time.monotonic() < until:
            if not self._in.poll(0, zmq.POLLIN):
                return 0.05
            self._process(self._in.recv_multipart())
        return 0.0

    def _process(self, parts: Sequence[bytes]) -> None:
        self.stats["frames_in"] += 1
        header = _parse_header(parts)
        if header is None or len(parts) != 2:
            return
        shape = tuple(int(x) for x in header["shape"])
        if len(shape) != 3 or shape[2] != 3 or len(parts[1]) != shape[0] * shape[1] * 3:
            return
        if self._stage is None:
            return
        image = np.frombuffer(parts[1], dtype=np.uint8).reshape(shape)
        record = self._stage.process(image, float(header["ts"]))
        if record is None:
            return
        self.stats["faces"] += 1
        tag, new = self._sessions.tag(str(header["segment"]), record.timestamp)
        if new:
            self.stats["sessions"] += 1
        try:
            self._out.send_multipart(service.encode_record(tag, record), copy=True)
            self.stats["records_sent"] += 1
        except zmq.Again:
            self.stats["records_dropped"] += 1

    def drain(self, deadline: float) -> None:
        """Process every frame already queued (if the models are loaded), then let the records go out."""
        while self._stage is not None and time.monotonic() < deadline and self._in.poll(0, zmq.POLLIN):
            self._process(self._in.recv_multipart())

    def close(self) -> None:
        """Close the stage and sockets."""
        if self._stage is not None:
            self._stage.close()
        self._in.close()
        self._out.close()
        super().close()


class LearnerWorker(Worker):
    """Writes records into the encrypted cache and runs personalization / federation jobs on request."""

    role = "learner"
    drain_share = 0.25

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._in = self.context.socket(zmq.PULL)
        self._in.setsockopt(zmq.RCVHWM, self.config.daemon.queue_hwm)
        self._in.setsockopt(zmq.LINGER, 0)
        self._in.bind(endpoint(self.run_dir, "records"))
        self.stats.update(records_in=0, records_cached=0, records_dropped=0, jobs_done=0, jobs_failed=0)
        self._sink: service.RecordSink | None = None
        try:
            self._sink = service.open_record_sink(self.config)
        except service.ComponentUnavailableError as exc:
            self.stats["unavailable"] = str(exc)
            _log.error("cache unavailable; records are counted and discarded", extra={"reason": str(exc)})
        self._job: threading.Thread | None = None

    def on_command(self, command: dict[str, Any]) -> None:
        """Start a ``personalize`` or ``join`` job in a thread (one at a time) so heartbeats continue."""
        super().on_command(command)
        if command.get("type") != "job":
            return
        job_id, kind = str(command.get("job", "")), str(command.get("kind", ""))
        if self._job is not None and self._job.is_alive():
            self.send_event({"type": "result", "job": job_id, "ok": False, "error": "another job is running"})
            return
        runner = service.JOBS.get(kind)
        if runner is None:
            self.send_event({"type": "result", "job": job_id, "ok": False, "error": "unknown job"})
            return
        self._job = threading.Thread(target=self._run_job, args=(job_id, runner), daemon=True)
        self._job.start()

    def _run_job(self, job_id: str, runner: Callable[[AgentConfig], dict[str, Any]]) -> None:
        try:
            result = runner(self.config)
        except FedferError as exc:
            self.stats["jobs_failed"] += 1
            self.outbox.put({"type": "result", "job": job_id, "ok": False, "error": str(exc)})
            return
        except Exception as exc:  # a job must never take the worker down; report its type only
            _log.exception("job failed")
            self.stats["jobs_failed"] += 1
            self.outbox.put({"type": "result", "job": job_id, "ok": False, "error": type(exc).__name__})
            return
        self.stats["jobs_done"] += 1
        self.outbox.put({"type": "result", "job": job_id, "ok": True, "result": result})

    def step(self) -> float:
        """Store queued records for at most half a heartbeat interval."""
        if self._job is not None and self._job.is_alive():
            self.state = "busy"
        else:
            self.state = "running" if self._sink is not None else "unavailable"
        until = time.monotonic() + self.config.daemon.heartbeat_interval_s / 2
        while time.monotonic() < until:
            if not self._in.poll(0, zmq.POLLIN):
                if self._sink is not None:
                    self._sink.idle(time.monotonic())
                return 0.05
            self._store(self._in.recv_multipart())
        return 0.0

    def _store(self, parts: Sequence[bytes]) -> None:
        self.stats["records_in"] += 1
        decoded = service.decode_record(parts)
        if decoded is None or self._sink is None:
            self.stats["records_dropped"] += 1
            return
        self._sink.put(*decoded, now=time.monotonic())
        self.stats["records_cached"] += 1

    def drain(self, deadline: float) -> None:
        """Store every record already queued, close the sessions and the cache, and cancel a running job.

        Records come first: they are what must not be lost. A job is cancelled (its round calls end, its
        channel closes; nothing half-done is saved or sent) and awaited until ``deadline``; a computation it
        left running is abandoned with the process (:attr:`abandoned` tells :func:`main` to exit at once).
        """
        if self._job is not None and self._job.is_alive():
            service.cancel_jobs()
        while time.monotonic() < deadline and self._in.poll(0, zmq.POLLIN):
            self._store(self._in.recv_multipart())
        if self._sink is not None:
            self._sink.close()
            self._sink = None
        if self._job is not None:
            self._job.join(max(0.0, deadline - time.monotonic()))
            if self._job.is_alive() or service.computations_running():
                _log.warning("a job did not stop before the drain bound; abandoning it")
                self.abandoned = True

    def close(self) -> None:
        """Close the sockets."""
        self._in.close()
        super().close()


def _prepare_vision_runtime() -> None:
    """Before torch is imported: OpenMP threads sleep instead of spinning when idle.

    With torch's default (active) wait policy, two threads next to MediaPipe ran more than 10x slower.
    """
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"


def _limit_torch_threads() -> dict[str, Any]:
    """One torch thread for the vision stage (when torch is installed); returns what was set, for status."""
    try:
        import torch
    except ImportError:
        return {}
    torch.set_num_threads(1)
    return {
        "torch_threads": int(torch.get_num_threads()),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
    }


def _parse_header(parts: Sequence[bytes]) -> dict[str, Any] | None:
    if not parts or len(parts[0]) > _MAX_HEADER:
        return None
    try:
        header = json.loads(parts[0])
    except ValueError:
        return None
    if not isinstance(header, dict) or not {"segment", "ts", "shape"} <= header.keys():
        return None
    return header


_WORKERS: dict[str, type[Worker]] = {
    "capture": CaptureWorker,
    "vision": VisionWorker,
    "learner": LearnerWorker,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of one worker process (started by the supervisor, not by people)."""
    parser = argparse.ArgumentParser(prog="fedfer-agent-worker")
    parser.add_argument("--role", choices=sorted(_WORKERS), required=True)
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--paused", action="store_true", help="start paused (capture)")
    args = parser.parse_args(argv)
    _set_parent_death_signal()
    if args.role == "vision":
        _prepare_vision_runtime()
    # The supervisor coordinates shutdown: a terminal's Ctrl-C reaches it, not each worker on its own.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    config = config_from_dict(json.loads((args.run_dir / CONFIG_FILE).read_text(encoding="utf-8")))
    stream = capture_native_stderr()
    configure_logging(
        role=args.role, level=config.agent.log_level, log_file=config.agent.log_file, stream=stream
    )
    context: zmq.Context[Any] = zmq.Context()
    try:
        worker = _WORKERS[args.role](config=config, run_dir=args.run_dir, context=context)
        worker.paused = args.paused
        signal.signal(signal.SIGTERM, worker.request_stop)
        _log.info("worker started")
        status = worker.run()
        if worker.abandoned:
            # Interpreter shutdown could wait on the abandoned computation (or its libraries' exit hooks);
            # everything worth keeping is closed already, so leave now.
            context.destroy(linger=1000)
            logging.shutdown()
            os._exit(status)
        return status
    except FedferError as exc:
        _log.error("worker failed: %s", str(exc))
        return 3
    except Exception:  # a bug: log it as JSON (type and message only) and let the supervisor restart us
        _log.exception("worker crashed")
        return 1
    finally:
        context.destroy(linger=1000)


if __name__ == "__main__":
    raise SystemExit(main())
