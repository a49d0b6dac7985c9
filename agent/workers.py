"""The agent's worker processes: capture, vision and learner, joined by ZeroMQ.

Each worker is its own process (``python -m agent.workers --role ROLE --run-dir DIR``) started by the
supervisor. The wiring, all IPC sockets inside the private ``run/`` directory::

    capture ──PUSH(frames.ipc, HWM)──► vision ──PUSH(records.ipc, HWM)──► learner (writes the encrypted cache)
    every worker ◄──DEALER/ROUTER(workers.ipc)──► supervisor: hello, heartbeats, commands, job results

Queues are bounded (``daemon.queue_hwm`` messages each). What happens when one is full depends on the source:

* live (camera, stream, looping file): capture drops the frame, vision drops the record after a bounded
  wait; both are counted (``frames_dropped``, ``records_dropped``; ``status`` sums them under ``drops``);
* finite file source: nothing is dropped. Capture and vision wait (in bounded steps, heartbeating) until there
  is room, and an end marker follows each file through the pipeline; the learner marks the file done in the
  ledger (:mod:`agent.ledger`) only when every record vision sent for it is stored.

Frames travel only in RAM. Drain contract on SIGTERM (the supervisor stops capture, then vision, then the
learner, all within ``daemon.drain_timeout_s``): capture stops reading at once and the frames it had queued
still go out; vision receives every one of them (``frames_in`` reaches capture's ``frames_sent``) and runs
the vision stage on each (``frames_discarded`` counts those it could not, e.g. models unavailable); the
learner stores every record vision sent (``records_in`` reaches vision's ``records_sent``). The supervisor's
last log line (``agent stopped``) reports what the bound cut off (``vision_unprocessed``,
``records_unstored``; zero after a complete drain). A worker whose supervisor dies exits too (Linux
parent-death signal, plus a parent-pid check everywhere else). What each stage does is pluggable:
:mod:`agent.service` binds the real capture, vision, cache and learning components.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import ctypes
import dataclasses
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

from fedfer.agent import service
from fedfer.agent.capture import CaptureError
from fedfer.agent.config import AgentConfig, config_from_dict
from fedfer.agent.logs import capture_native_stderr, configure_logging
from fedfer.agent.paths import is_disk_full
from fedfer.security.errors import FedferError

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
        self._unsent: collections.deque[dict[str, Any]] = collections.deque()

    # -- supervisor link --------------------------------------------------------------------------
    def send_event(self, event: dict[str, Any]) -> bool:
        """Send one event to the supervisor (main thread only, never blocking); whether the link took it.

        Heartbeats that do not fit are simply skipped (the next one carries fresher counters); events posted
        to :attr:`outbox` (job results) are kept and sent again until the link takes them.
        """
        event = {"role": self.role, "pid": os.getpid(), **event}
        try:
            self._link.send(json.dumps(event, default=str).encode("utf-8"), zmq.NOBLOCK)
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


def _wait_ms(config: AgentConfig) -> int:
    """The bounded wait for room in a full queue: half a heartbeat interval, at most 2 s."""
    return int(min(2.0, config.daemon.heartbeat_interval_s / 2) * 1000)


class CaptureWorker(Worker):
    """Reads the video source at the configured rate and pushes frames to vision.

    A live source (camera, stream, looping file) never waits for vision: a full queue drops the frame
    (counted). A finite file source loses nothing: the frame waits (a bounded wait per step, so heartbeats and
    commands go on) until the queue has room, and a file read to its end is followed by an end marker.
    """

    role = "capture"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._out = self.context.socket(zmq.PUSH)
        self._out.setsockopt(zmq.SNDHWM, self.config.daemon.queue_hwm)
        self._out.setsockopt(zmq.LINGER, 1000)
        self._out.connect(endpoint(self.run_dir, "frames"))
        self._finite = service.file_source(self.config)
        self._source: service.FrameSource | None = None
        self._items: Iterator[service.Frame | service.SegmentEnd] | None = None
        self._pending: service.Frame | service.SegmentEnd | None = None
        self._started = self._paused_at = time.monotonic()
        self._retry_at = 0.0
        self._failures = 0
        self.stats.update(
            frames_read=0,
            frames_sent=0,
            frames_dropped=0,
            files_ended=0,
            queue_full_waits=0,
            source_done=False,
        )

    def _open(self) -> Iterator[service.Frame | service.SegmentEnd]:
        self._source = service.open_source(self.config)
        self._items = iter(self._source)
        self._started = time.monotonic()
        return self._items

    def _release(self) -> None:
        if self._source is not None:
            self._source.close()
        self._source = self._items = self._pending = None

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
        """Read one frame (or end marker) and send it when it is due (see the class doc for a full queue)."""
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
                items = self._items if self._items is not None else self._open()
                item = next(items, None)
            except CaptureError as exc:  # a misconfigured source (other errors) still ends the worker
                return self._source_failed(exc)
            if item is None:
                self.stats["source_done"] = True
                self._release()
                return 0.0
            if isinstance(item, service.Frame):
                self.stats["frames_read"] += 1
            self._failures = 0
            self._pending = item
        pending = self._pending
        if self.config.capture.realtime and isinstance(pending, service.Frame):
            wait = self._started + pending.due_s - time.monotonic()
            if wait > 0:
                self.state = "running"
                return wait
        if self._send(pending):
            self._pending = None
            self.state = "running"
        else:
            self.state = "blocked"
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

    def _send(self, item: service.Frame | service.SegmentEnd) -> bool:
        """Queue ``item`` for vision; ``False`` when a finite source must try again (the queue is full)."""
        if isinstance(item, service.SegmentEnd):
            header: dict[str, Any] = {
                "end": True,
                "segment": item.segment,
                "file": item.file,
                "reading": item.reading,
                "frames": item.frames,
            }
            parts: list[Any] = [json.dumps(header).encode("utf-8")]
        else:
            header = {"segment": item.segment, "ts": item.timestamp, "shape": list(item.image.shape)}
            if item.file is not None:
                header.update(file=item.file, reading=item.reading, index=item.index)
            parts = [json.dumps(header).encode("utf-8"), np.ascontiguousarray(item.image).data]
        if self._finite and not self._out.poll(_wait_ms(self.config), zmq.POLLOUT):
            self.stats["queue_full_waits"] += 1
            return False
        try:
            self._out.send_multipart(parts, zmq.NOBLOCK, copy=False)
        except zmq.Again:
            if self._finite:
                self.stats["queue_full_waits"] += 1
                return False
            self.stats["frames_dropped"] += 1
            return True
        if isinstance(item, service.SegmentEnd):
            self.stats["files_ended"] += 1
        else:
            self.stats["frames_sent"] += 1
        return True

    def drain(self, deadline: float) -> None:
        """Stop reading at once; frames already queued still go out within the socket linger.

        A file cut short here has no end marker: it is not marked done and is read again next time.
        """
        self._release()

    def close(self) -> None:
        """Close the frame socket and the supervisor link."""
        self._out.close()
        super().close()


@dataclasses.dataclass
class _Reading:
    """What vision saw of one reading of a file."""

    file: str
    reading: int
    next_index: int = 0
    complete: bool = True
    records: int = 0


class VisionWorker(Worker):
    """Turns frames into face records (no frame ever leaves this process) and cuts them into sessions.

    Records of a live source get a bounded wait for room in the learner's queue and are dropped (counted)
    after it. Records and end markers of a finite file source are never dropped: while they cannot go out,
    vision stops taking frames, so the back-pressure reaches capture.
    """

    role = "vision"
    drain_share = 0.45
    _MAX_READINGS = 16

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._in = self.context.socket(zmq.PULL)
        self._in.setsockopt(zmq.RCVHWM, self.config.daemon.queue_hwm)
        self._in.setsockopt(zmq.LINGER, 0)
        self._in.bind(endpoint(self.run_dir, "frames"))
        self._out = self.context.socket(zmq.PUSH)
        self._out.setsockopt(zmq.SNDHWM, self.config.daemon.queue_hwm)
        self._out.setsockopt(zmq.LINGER, 2000)
        self._out.connect(endpoint(self.run_dir, "records"))
        self.stats.update(
            frames_in=0, frames_discarded=0, faces=0, records_sent=0, records_dropped=0, sessions=0
        )
        self._stage: service.VisionStage | None = None
        self._loader: threading.Thread | None = None
        self._sessions = service.SessionCutter(gap_s=self.config.vision.session_gap_s)
        self._readings: dict[str, _Reading] = {}
        self._backlog: collections.deque[list[bytes]] = collections.deque()

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
            if not self._flush(_wait_ms(self.config)):
                self.state = "blocked"
                return 0.0
            if not self._in.poll(0, zmq.POLLIN):
                return 0.05
            self._process(self._in.recv_multipart())
        return 0.0

    def _flush(self, wait_ms: int) -> bool:
        """Send what the backlog holds (file records, end markers); whether it is empty now."""
        while self._backlog:
            if not self._out.poll(wait_ms, zmq.POLLOUT):
                return False
            try:
                self._out.send_multipart(self._backlog[0], zmq.NOBLOCK, copy=True)
            except zmq.Again:
                return False
            if len(self._backlog.popleft()) == 3:
                self.stats["records_sent"] += 1
        return True

    def _process(self, parts: Sequence[bytes]) -> None:
        header = _parse_header(parts)
        if header is not None and header.get("end") is True and len(parts) == 1:
            self._end_of_file(header)
            return
        self.stats["frames_in"] += 1
        reading = self._track(header)
        shape = _frame_shape(header, parts)
        if header is None or shape is None or self._stage is None:
            self.stats["frames_discarded"] += 1
            if reading is not None:
                reading.complete = False  # the file is not stored whole: it will be read again
            return
        image = np.frombuffer(parts[1], dtype=np.uint8).reshape(shape)
        record = self._stage.process(image, float(header["ts"]))
        if record is None:
            return
        self.stats["faces"] += 1
        tag, new = self._sessions.tag(str(header["segment"]), record.timestamp)
        if new:
            self.stats["sessions"] += 1
        if reading is None:
            self._send_live(service.encode_record(tag, record))
            return
        reading.records += 1
        origin = service.FileOrigin(reading.file, reading.reading)
        self._backlog.append(service.encode_record(tag, record, origin))

    def _track(self, header: dict[str, Any] | None) -> _Reading | None:
        """The reading a file frame belongs to, checking that its frames arrive complete and in order."""
        if header is None or "file" not in header:
            return None
        segment = str(header["segment"])
        reading = self._readings.get(segment)
        if reading is None:
            try:
                reading = _Reading(str(header["file"]), int(header["reading"]))
            except (TypeError, ValueError):
                return None
            self._readings[segment] = reading
            while len(self._readings) > self._MAX_READINGS:
                del self._readings[next(iter(self._readings))]
        index = header.get("index")
        if index != reading.next_index:
            reading.complete = False  # frames were lost before they reached this process (or it restarted)
        reading.next_index = int(index) + 1 if type(index) is int else reading.next_index + 1
        return reading

    def _end_of_file(self, header: dict[str, Any]) -> None:
        reading = self._readings.pop(str(header.get("segment")), None)
        try:
            end = service.FileEnd(
                file=str(header["file"]),
                reading=int(header["reading"]),
                complete=reading is not None and reading.complete and reading.next_index == header["frames"],
                records=reading.records if reading is not None else 0,
            )
        except (KeyError, TypeError, ValueError):
            return
        self._backlog.append(service.encode_file_end(end))

    def _send_live(self, message: list[bytes]) -> None:
        """A live record: wait a bounded time for room in the learner's queue, else drop it (counted)."""
        if self._out.poll(_wait_ms(self.config), zmq.POLLOUT):
            try:
                self._out.send_multipart(message, zmq.NOBLOCK, copy=True)
                self.stats["records_sent"] += 1
                return
            except zmq.Again:
                pass
        self.stats["records_dropped"] += 1

    def drain(self, deadline: float) -> None:
        """Process every frame already queued (models loaded) and send every record, by ``deadline``.

        Frames still in flight from a capture that just stopped are waited for briefly.
        """
        while time.monotonic() < deadline:
            wait = int(max(0.0, min(0.05, deadline - time.monotonic())) * 1000)
            if not self._flush(wait):
                continue
            if not self._in.poll(wait, zmq.POLLIN):
                return
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
        self.stats.update(
            records_in=0,
            records_cached=0,
            records_discarded=0,
            records_dropped=0,
            records_disk_full=0,
            disk_full=False,
            files_done=0,
            files_incomplete=0,
            jobs_done=0,
            jobs_failed=0,
        )
        self._sink: service.RecordSink | None = None
        self._disk_full_logged = 0.0
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
            self.outbox.put({"type": "result", "job": job_id, "ok": False, "error": "another job is running"})
            return
        runner = service.JOBS.get(kind)
        if runner is None:
            self.outbox.put({"type": "result", "job": job_id, "ok": False, "error": "unknown job"})
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
                    try:
                        self._sink.idle(time.monotonic())
                    except OSError as exc:  # sealing wrote nothing; the session stays open and readable
                        self._refused(exc, record=False)
                return 0.05
            self._store(self._in.recv_multipart())
        return 0.0

    def _store(self, parts: Sequence[bytes]) -> None:
        if len(parts) == 1:
            end = service.decode_file_end(parts)
            try:
                done = end is not None and self._sink is not None and self._sink.end_file(end)
            except OSError as exc:  # the ledger could not be written: the file is read again later
                self._refused(exc, record=False)
                done = False
            self.stats["files_done" if done else "files_incomplete"] += 1
            return
        self.stats["records_in"] += 1
        decoded = service.decode_record(parts)
        if decoded is None or self._sink is None:
            self.stats["records_dropped"] += 1
            return
        tag, record, origin = decoded
        try:
            stored = self._sink.put(tag, record, now=time.monotonic(), origin=origin)
        except OSError as exc:
            self._refused(exc, record=True)
            return
        self._disk_full(False)
        self.stats["records_cached" if stored else "records_discarded"] += 1

    def _refused(self, exc: OSError, *, record: bool) -> None:
        """Count a write the full disk refused (``record``: a record was lost with it); re-raise the rest."""
        if not is_disk_full(exc):
            raise exc
        self._disk_full(True, record=record)

    def _disk_full(self, full: bool, *, record: bool = True) -> None:
        """Count a record the full disk refused; say so when that starts (then once a minute) and ends."""
        now = time.monotonic()
        if full:
            self.stats["records_disk_full"] += int(record)
            if not self.stats["disk_full"] or now - self._disk_full_logged > 60.0:
                self._disk_full_logged = now
                _log.warning(
                    "disk full: records are not cached until there is space (stored ones are kept)",
                    extra={"records_disk_full": self.stats["records_disk_full"]},
                )
        elif self.stats["disk_full"]:
            _log.info("disk space is back: caching records again")
        self.stats["disk_full"] = full

    def drain(self, deadline: float) -> None:
        """Store every record already queued, close the sessions and the cache, and cancel a running job.

        Records come first: they are what must not be lost. A job is cancelled (its round calls end, its
        channel closes; nothing half-done is saved or sent) and awaited until ``deadline``; a computation it
        left running is abandoned with the process (:attr:`abandoned` tells :func:`main` to exit at once).
        """
        if self._job is not None and self._job.is_alive():
            service.cancel_jobs()
        while time.monotonic() < deadline:
            wait = int(max(0.0, min(0.05, deadline - time.monotonic())) * 1000)
            if not self._in.poll(wait, zmq.POLLIN):
                break
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
    if not isinstance(header, dict) or "segment" not in header:
        return None
    return header


def _frame_shape(header: dict[str, Any] | None, parts: Sequence[bytes]) -> tuple[int, int, int] | None:
    """The ``(H, W, 3)`` shape of a well-formed frame message, else ``None``."""
    if header is None or len(parts) != 2 or "ts" not in header:
        return None
    try:
        height, width, channels = (int(x) for x in header["shape"])
    except (TypeError, ValueError):
        return None
    if channels != 3 or height < 1 or width < 1 or len(parts[1]) != height * width * 3:
        return None
    return height, width, channels


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
    parser.add_argument("--supervisor-pid", type=int, default=None, help="the process that started it")
    args = parser.parse_args(argv)
    _set_parent_death_signal()
    if args.supervisor_pid is not None and os.getppid() != args.supervisor_pid:
        # The supervisor died before the death signal was armed (it never fires then): do not linger.
        return 1
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
