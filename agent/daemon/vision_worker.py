"""The vision worker: turns frames into face records (no frame ever leaves this process) and cuts them into
sessions.

Frames arrive on ``frames.ipc``, go through the vision stage
(:func:`fedfer.agent.vision.pipeline.open_vision`, loaded on the first frame in a helper thread so heartbeats
go on) and leave as records on ``records.ipc``. For a finite file source, vision checks that every frame of a
reading arrived in order and sends the reading's account (:class:`~fedfer.agent.store.sink.FileEnd`) behind
its last record, so the learner marks a file done only when all of it is stored.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import zmq

from fedfer.agent.capture.sources import SegmentEnd
from fedfer.agent.capture.video import Frame
from fedfer.agent.daemon.wire import (
    SEGMENT_END,
    decode_frame,
    decode_segment_end,
    encode_file_end,
    encode_record,
    kind_of,
)
from fedfer.agent.daemon.worker import Worker, wait_ms
from fedfer.agent.errors import ComponentUnavailableError
from fedfer.agent.records import FrameRecord
from fedfer.agent.store.sink import FileEnd, FileOrigin
from fedfer.agent.vision.sessions import SessionCutter

__all__ = ["VisionStage", "VisionWorker", "prepare_vision_runtime"]

_log = logging.getLogger(__name__)


class VisionStage(Protocol):
    """What the vision worker runs (a :class:`~fedfer.agent.vision.pipeline.VisionPipeline`)."""

    def process(self, image: np.ndarray, timestamp: float) -> FrameRecord | None:
        """Frame → record (``None`` when no face is found)."""
        ...

    def close(self) -> None:
        """Release models."""
        ...


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
        self._in = self.queue_in("frames")
        self._out = self.queue_out("records", linger_ms=2000)
        self.stats.update(
            frames_in=0, frames_discarded=0, faces=0, records_sent=0, records_dropped=0, sessions=0
        )
        self._stage: VisionStage | None = None
        self._loader: threading.Thread | None = None
        self._sessions = SessionCutter(gap_s=self.config.vision.session_gap_s)
        self._readings: dict[str, _Reading] = {}
        # File records and end markers, in order, waiting for room in the learner's queue (True: a record).
        self._backlog: collections.deque[tuple[list[bytes], bool]] = collections.deque()

    def _load_stage(self) -> None:
        # Runs in a thread: heartbeats, commands and SIGTERM stay responsive while models load.
        try:
            self.stats.update(_limit_torch_threads())
            from fedfer.agent.vision.pipeline import open_vision  # imports torch: after the runtime is set

            self._stage = open_vision(self.config)
        except ComponentUnavailableError as exc:
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
            if not self._flush(wait_ms(self.config)):
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
                self._out.send_multipart(self._backlog[0][0], zmq.NOBLOCK, copy=True)
            except zmq.Again:
                return False
            if self._backlog.popleft()[1]:
                self.stats["records_sent"] += 1
        return True

    def _process(self, parts: Sequence[bytes]) -> None:
        if kind_of(parts) == SEGMENT_END:
            end = decode_segment_end(parts)
            if end is not None:
                self._end_of_file(end)
            return
        self.stats["frames_in"] += 1
        frame = decode_frame(parts)
        reading = self._track(frame) if frame is not None else None
        if frame is None or self._stage is None:
            self.stats["frames_discarded"] += 1
            if reading is not None:
                reading.complete = False  # the file is not stored whole: it will be read again
            return
        record = self._stage.process(frame.image, frame.timestamp)
        if record is None:
            return
        self.stats["faces"] += 1
        tag, new = self._sessions.tag(frame.segment, record.timestamp)
        if new:
            self.stats["sessions"] += 1
        if reading is None:
            self._send_live(encode_record(tag, record))
            return
        reading.records += 1
        origin = FileOrigin(reading.file, reading.reading)
        self._backlog.append((encode_record(tag, record, origin), True))

    def _track(self, frame: Frame) -> _Reading | None:
        """The reading a file frame belongs to, checking that its frames arrive complete and in order."""
        if frame.file is None:
            return None
        reading = self._readings.get(frame.segment)
        if reading is None:
            reading = _Reading(frame.file, frame.reading)
            self._readings[frame.segment] = reading
            while len(self._readings) > self._MAX_READINGS:
                del self._readings[next(iter(self._readings))]
        if frame.index != reading.next_index:
            reading.complete = False  # frames were lost before they reached this process (or it restarted)
        reading.next_index = frame.index + 1
        return reading

    def _end_of_file(self, end: SegmentEnd) -> None:
        reading = self._readings.pop(end.segment, None)
        account = FileEnd(
            file=end.file,
            reading=end.reading,
            complete=reading is not None and reading.complete and reading.next_index == end.frames,
            records=reading.records if reading is not None else 0,
            members=end.members,
        )
        self._backlog.append((encode_file_end(account), False))

    def _send_live(self, message: list[bytes]) -> None:
        """A live record: wait a bounded time for room in the learner's queue, else drop it (counted)."""
        if self._out.poll(wait_ms(self.config), zmq.POLLOUT):
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


def prepare_vision_runtime() -> None:
    """Before torch is imported: OpenMP threads sleep instead of spinning when idle.

    With torch's default (active) wait policy, two threads next to MediaPipe ran more than 10x slower.
    """
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"


def _limit_torch_threads() -> dict[str, Any]:
    """One torch thread for the vision stage; returns what was set, for status."""
    import torch  # only here: prepare_vision_runtime must run before torch is imported

    torch.set_num_threads(1)
    return {
        "torch_threads": int(torch.get_num_threads()),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
    }
