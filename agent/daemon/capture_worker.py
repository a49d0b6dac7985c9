"""The capture worker: reads the video source at the configured rate and pushes frames to vision.

Frames exist only in RAM: the source (:func:`fedfer.agent.capture.sources.open_source`) decodes them, this
process sends them on ``frames.ipc`` (:func:`fedfer.agent.daemon.wire.encode_frame`) and forgets them. A
source that fails (a vanished file, an unplugged camera) is retried with backoff; a file of a folder that
cannot be read is skipped (counted, logged once, and named with its reason in ``status``), capture going on
with the next file; pausing releases a camera.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import zmq

from fedfer.agent.capture.sources import FileFailed, FrameSource, SegmentEnd, file_source, open_source
from fedfer.agent.capture.video import CaptureError, Frame
from fedfer.agent.daemon.wire import encode_frame, encode_segment_end
from fedfer.agent.daemon.worker import Worker, wait_ms

__all__ = ["CaptureWorker"]

_log = logging.getLogger(__name__)

#: How many failed files ``status`` names (the latest; ``files_failed`` counts them all).
_FAILED_SHOWN = 20


class CaptureWorker(Worker):
    """Reads the video source at the configured rate and pushes frames to vision.

    A live source (camera, stream, looping file) never waits for vision: a full queue drops the frame
    (counted). A finite file source loses nothing: the frame waits (a bounded wait per step, so heartbeats and
    commands go on) until the queue has room, and a file read to its end is followed by an end marker.

    Files the source skips as unreadable are in the stats: ``files_failed`` (how many) and ``failed_files``
    (the latest, ``{"file": name, "reason": why}``).
    """

    role = "capture"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._out = self.queue_out("frames", linger_ms=1000)
        self._finite = file_source(self.config)
        self._source: FrameSource | None = None
        self._items: Iterator[Frame | SegmentEnd | FileFailed] | None = None
        self._pending: Frame | SegmentEnd | None = None
        self._failed: dict[str, str] = {}  # the latest failed files shown in the stats: name -> reason
        self._failed_names: set[str] = set()  # every failed file this worker counted
        self._started = self._paused_at = time.monotonic()
        self._retry_at = 0.0
        self._failures = 0
        self.stats.update(
            frames_read=0,
            frames_sent=0,
            frames_dropped=0,
            files_ended=0,
            files_failed=0,
            failed_files=[],
            queue_full_waits=0,
            source_done=False,
        )

    def _open(self) -> Iterator[Frame | SegmentEnd | FileFailed]:
        self._source = open_source(self.config)
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
            if self._failures:  # the source works again: the error is history
                self._failures = 0
                self.stats.pop("source_error", None)
                self.stats["source_failures"] = 0
            if isinstance(item, FileFailed):
                self._file_failed(item)
                return 0.0
            if isinstance(item, Frame):
                self.stats["frames_read"] += 1
            self._pending = item
        pending = self._pending
        if self.config.capture.realtime and isinstance(pending, Frame):
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

    def _file_failed(self, failed: FileFailed) -> None:
        """A file the source skipped as unreadable: counted, named in the stats, logged the first time."""
        if failed.name in self._failed_names:
            return
        self._failed_names.add(failed.name)
        self._failed[failed.name] = failed.reason
        while len(self._failed) > _FAILED_SHOWN:
            del self._failed[next(iter(self._failed))]
        self.stats["files_failed"] += 1
        self.stats["failed_files"] = [{"file": n, "reason": r} for n, r in self._failed.items()]
        _log.warning(
            "a file of the capture source cannot be read; skipped"
            + (" (as before: unchanged since it failed)" if failed.known else ""),
            extra={"file": failed.name, "reason": failed.reason},
        )

    def _source_failed(self, exc: CaptureError) -> float:
        """A source failure (vanished file, unplugged camera) is reported and retried with backoff.

        ``source_error`` (the last error) and ``source_failures`` (failures in a row) are in the stats until
        the source delivers again.
        """
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

    def _send(self, item: Frame | SegmentEnd) -> bool:
        """Queue ``item`` for vision; ``False`` when a finite source must try again (the queue is full)."""
        parts = encode_segment_end(item) if isinstance(item, SegmentEnd) else encode_frame(item)
        if self._finite and not self._out.poll(wait_ms(self.config), zmq.POLLOUT):
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
        if isinstance(item, SegmentEnd):
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
