"""The learner worker: writes records into the encrypted cache and runs the jobs the control plane asks for.

Records arrive on ``records.ipc`` and go into the record sink (:mod:`fedfer.agent.store.sink`); a full disk
refuses a record without losing what is stored (counted, said once a minute). Jobs (``personalize``,
``join``, :mod:`fedfer.agent.daemon.jobs`) run in a thread, one at a time, so heartbeats continue; their
results go back to the supervisor through the worker's outbox.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

import zmq

from fedfer.agent.daemon.jobs import JOBS, JobRunner
from fedfer.agent.daemon.wire import FILE_END, decode_file_end, decode_record, kind_of
from fedfer.agent.daemon.worker import Worker
from fedfer.agent.errors import ComponentUnavailableError
from fedfer.agent.files import is_disk_full
from fedfer.agent.store.sink import RecordSink, open_record_sink
from fedfer.security.errors import FedferError

__all__ = ["LearnerWorker"]

_log = logging.getLogger(__name__)


class LearnerWorker(Worker):
    """Writes records into the encrypted cache and runs personalization / federation jobs on request."""

    role = "learner"
    drain_share = 0.25

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._in = self.queue_in("records")
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
        self._sink: RecordSink | None = None
        self._disk_full_logged = 0.0
        try:
            self._sink = open_record_sink(self.config)
        except ComponentUnavailableError as exc:
            self.stats["unavailable"] = str(exc)
            _log.error("cache unavailable; records are counted and discarded", extra={"reason": str(exc)})
        self._job: threading.Thread | None = None
        self._jobs = JobRunner()

    def on_command(self, command: dict[str, Any]) -> None:
        """Start a ``personalize`` or ``join`` job in a thread (one at a time) so heartbeats continue."""
        super().on_command(command)
        if command.get("type") != "job":
            return
        job_id, kind = str(command.get("job", "")), str(command.get("kind", ""))
        if self._job is not None and self._job.is_alive():
            self.outbox.put({"type": "result", "job": job_id, "ok": False, "error": "another job is running"})
            return
        if kind not in JOBS:
            self.outbox.put({"type": "result", "job": job_id, "ok": False, "error": "unknown job"})
            return
        self._job = threading.Thread(target=self._run_job, args=(job_id, kind), daemon=True)
        self._job.start()

    def _run_job(self, job_id: str, kind: str) -> None:
        try:
            result = self._jobs.run(kind, self.config)
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
        if kind_of(parts) == FILE_END:
            end = decode_file_end(parts)
            try:
                done = end is not None and self._sink is not None and self._sink.end_file(end)
            except OSError as exc:  # the ledger could not be written: the file is read again later
                self._refused(exc, record=False)
                done = False
            self.stats["files_done" if done else "files_incomplete"] += 1
            return
        self.stats["records_in"] += 1
        decoded = decode_record(parts)
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
            self._jobs.cancel()
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
            if self._job.is_alive() or self._jobs.computing():
                _log.warning("a job did not stop before the drain bound; abandoning it")
                self.abandoned = True

    def close(self) -> None:
        """Close the sockets."""
        self._in.close()
        super().close()
