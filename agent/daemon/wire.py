"""Every message between the daemon's processes, and the sockets they travel on.

All sockets are ZeroMQ over IPC paths inside the private ``run/`` directory (:func:`endpoint`)::

    frames.ipc    capture PUSH ─► vision PULL      FRAME, SEGMENT_END
    records.ipc   vision PUSH ─► learner PULL      RECORD, FILE_END
    workers.ipc   every worker DEALER ◄─► supervisor ROUTER    events (worker → supervisor),
                                                               commands (supervisor → worker)

Each role binds the socket its upstream connects to, so they start in the order :data:`ROLES`. The control
socket (``control.ipc``, the CLI's requests) is the daemon's public interface and has its own module,
:mod:`fedfer.agent.daemon.control`.

Pipeline messages are multipart, the first part a JSON header (at most :data:`MAX_HEADER` bytes) whose
``kind`` names the message; frames and features travel only in RAM:

* ``frame``: ``[header, RGB uint8 pixels]``; the header names the segment, timestamp and shape, and for a
  finite file source the file, reading and index (:class:`~fedfer.agent.capture.video.Frame`);
* ``segment_end``: ``[header, member keys]``, a file (or run of images) read to its end
  (:class:`~fedfer.agent.capture.sources.SegmentEnd`); the second part is the run's image keys, 32 bytes
  each (empty for a video file);
* ``record``: ``[header, feature float16 x 1280, probabilities float32 x K]``, one face record with its
  session tag and, for a file source, its :class:`~fedfer.agent.store.sink.FileOrigin`;
* ``file_end``: ``[header, member keys]``, vision's account of one reading of a file or run
  (:class:`~fedfer.agent.store.sink.FileEnd`).

Supervisor-link messages are one JSON object each (:func:`encode_link`, :func:`decode_link`): events carry
``type`` (``hello``, ``heartbeat``, ``result``), ``role`` and ``pid``; commands carry ``type`` (``pause``,
``resume``, ``job``). Every decoder returns ``None`` for anything malformed; none raises.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedfer.agent.capture.images import MAX_RUN_IMAGES
from fedfer.agent.capture.sources import SegmentEnd
from fedfer.agent.capture.video import Frame
from fedfer.agent.records import FEATURE_DIM, MAX_CLASSES, FrameRecord
from fedfer.agent.store.sink import FileEnd, FileOrigin
from fedfer.security.errors import FedferError

__all__ = [
    "FILE_END",
    "FRAME",
    "MAX_HEADER",
    "MAX_LINK_BYTES",
    "RECORD",
    "ROLES",
    "SEGMENT_END",
    "decode_file_end",
    "decode_frame",
    "decode_link",
    "decode_record",
    "decode_segment_end",
    "encode_file_end",
    "encode_frame",
    "encode_link",
    "encode_record",
    "encode_segment_end",
    "endpoint",
    "kind_of",
]

#: Start order (each role binds the socket its upstream connects to); stop order is the reverse.
ROLES = ("learner", "vision", "capture")

FRAME = "frame"
SEGMENT_END = "segment_end"
RECORD = "record"
FILE_END = "file_end"
MAX_HEADER = 4096
#: The largest supervisor-link message the supervisor reads (a heartbeat is a few hundred bytes).
MAX_LINK_BYTES = 1 << 20


def endpoint(run_dir: Path, name: str) -> str:
    """The ZeroMQ IPC endpoint of socket ``name`` in ``run_dir`` (checked against the AF_UNIX path limit)."""
    path = run_dir / f"{name}.ipc"
    if len(os.fsencode(path)) > 100:
        raise FedferError(f"state directory path too long for a local socket: {path}")
    return f"ipc://{path}"


def _header(kind: str, **fields: Any) -> bytes:
    return json.dumps({"kind": kind, **fields}).encode("utf-8")


def _read_header(parts: Sequence[bytes], kind: str, count: int) -> dict[str, Any] | None:
    """The header of a ``kind`` message of ``count`` parts, or ``None``."""
    if len(parts) != count or len(parts[0]) > MAX_HEADER:
        return None
    try:
        header = json.loads(parts[0])
    except ValueError:
        return None
    if not isinstance(header, dict) or header.get("kind") != kind:
        return None
    return header


def kind_of(parts: Sequence[bytes]) -> str | None:
    """The ``kind`` a pipeline message says it is (``None`` when its header is unreadable)."""
    if not parts or len(parts[0]) > MAX_HEADER:
        return None
    try:
        header = json.loads(parts[0])
    except ValueError:
        return None
    kind = header.get("kind") if isinstance(header, dict) else None
    return kind if isinstance(kind, str) else None


def _members(keys: tuple[str, ...]) -> bytes:
    return b"".join(bytes.fromhex(k) for k in keys)


def _read_members(part: bytes) -> tuple[str, ...] | None:
    if len(part) % 32 or len(part) > 32 * MAX_RUN_IMAGES:
        return None
    return tuple(part[i : i + 32].hex() for i in range(0, len(part), 32))


def _origin_fields(origin: FileOrigin | None) -> dict[str, Any]:
    return {} if origin is None else {"file": origin.file, "reading": origin.reading}


def _origin(header: dict[str, Any]) -> FileOrigin | None:
    """The file origin a header names (``None``: live); ``ValueError`` when it names a bad one."""
    if "file" not in header:
        return None
    file, reading = header["file"], header["reading"]
    if not isinstance(file, str) or len(file) != 64 or type(reading) is not int:
        raise ValueError("bad file origin")
    return FileOrigin(file, reading)


# -- capture -> vision ----------------------------------------------------------------------------------


def encode_frame(frame: Frame) -> list[Any]:
    """Wire form of a sampled frame (the pixels go as a buffer, without a copy)."""
    fields: dict[str, Any] = {
        "segment": frame.segment,
        "ts": frame.timestamp,
        "shape": list(frame.image.shape),
    }
    if frame.file is not None:
        fields.update(file=frame.file, reading=frame.reading, index=frame.index)
    return [_header(FRAME, **fields), np.ascontiguousarray(frame.image).data]


def decode_frame(parts: Sequence[bytes]) -> Frame | None:
    """Inverse of :func:`encode_frame` (the image is a view of the message); ``None`` if malformed."""
    header = _read_header(parts, FRAME, 2)
    if header is None:
        return None
    try:
        height, width, channels = (int(x) for x in header["shape"])
        origin = _origin(header)
        index = header.get("index", 0)
        if type(index) is not int or not isinstance(header["segment"], str):
            return None
        timestamp = float(header["ts"])
    except (KeyError, TypeError, ValueError):
        return None
    if channels != 3 or height < 1 or width < 1 or len(parts[1]) != height * width * 3:
        return None
    image = np.frombuffer(parts[1], dtype=np.uint8).reshape(height, width, channels)
    return Frame(
        index=index,
        timestamp=timestamp,
        image=image,
        segment=header["segment"],
        file=None if origin is None else origin.file,
        reading=0 if origin is None else origin.reading,
    )


def encode_segment_end(end: SegmentEnd) -> list[bytes]:
    """Wire form of the end of one reading of a file."""
    fields = {"segment": end.segment, "file": end.file, "reading": end.reading, "frames": end.frames}
    return [_header(SEGMENT_END, **fields), _members(end.members)]


def decode_segment_end(parts: Sequence[bytes]) -> SegmentEnd | None:
    """Inverse of :func:`encode_segment_end`; ``None`` for anything else."""
    header = _read_header(parts, SEGMENT_END, 2)
    if header is None:
        return None
    try:
        origin = _origin(header)
        segment, frames = header["segment"], header["frames"]
    except (KeyError, TypeError, ValueError):
        return None
    members = _read_members(parts[1])
    if origin is None or members is None or not isinstance(segment, str) or type(frames) is not int:
        return None
    return SegmentEnd(segment, origin.file, origin.reading, frames, members)


# -- vision -> learner ----------------------------------------------------------------------------------


def encode_record(tag: str, record: FrameRecord, origin: FileOrigin | None = None) -> list[bytes]:
    """Wire form of one record for the vision → learner queue (RAM only)."""
    header = _header(
        RECORD,
        session=tag,
        ts=record.timestamp,
        box=list(record.box),
        score=record.score,
        **_origin_fields(origin),
    )
    return [header, record.feature.tobytes(), record.ifer_probs.tobytes()]


def decode_record(parts: Sequence[bytes]) -> tuple[str, FrameRecord, FileOrigin | None] | None:
    """Inverse of :func:`encode_record`: ``(tag, record, origin)``; ``None`` for anything malformed."""
    if len(parts) != 3 or len(parts[1]) != FEATURE_DIM * 2:
        return None
    if len(parts[2]) % 4 or not 0 < len(parts[2]) // 4 <= MAX_CLASSES:
        return None
    header = _read_header(parts, RECORD, 3)
    if header is None:
        return None
    try:
        record = FrameRecord(
            timestamp=float(header["ts"]),
            feature=np.frombuffer(parts[1], dtype=np.float16).copy(),
            ifer_probs=np.frombuffer(parts[2], dtype=np.float32).copy(),
            box=(
                float(header["box"][0]),
                float(header["box"][1]),
                float(header["box"][2]),
                float(header["box"][3]),
            ),
            score=float(header["score"]),
        )
        tag = str(header["session"])
        origin = _origin(header)
    except (ValueError, TypeError, KeyError, IndexError):
        return None
    return tag, record, origin


def encode_file_end(end: FileEnd) -> list[bytes]:
    """Wire form of a :class:`~fedfer.agent.store.sink.FileEnd`."""
    origin = _origin_fields(FileOrigin(end.file, end.reading))
    header = _header(FILE_END, complete=end.complete, records=end.records, **origin)
    return [header, _members(end.members)]


def decode_file_end(parts: Sequence[bytes]) -> FileEnd | None:
    """Inverse of :func:`encode_file_end`; ``None`` for anything else."""
    header = _read_header(parts, FILE_END, 2)
    if header is None:
        return None
    try:
        origin = _origin(header)
        complete, records = header["complete"], header["records"]
    except (ValueError, TypeError, KeyError):
        return None
    members = _read_members(parts[1])
    if origin is None or members is None or type(complete) is not bool or type(records) is not int:
        return None
    return FileEnd(origin.file, origin.reading, complete, records, members)


# -- worker <-> supervisor ------------------------------------------------------------------------------


def encode_link(message: dict[str, Any]) -> bytes:
    """Wire form of an event or a command (values JSON cannot hold are sent as text)."""
    return json.dumps(message, default=str).encode("utf-8")


def decode_link(raw: bytes) -> dict[str, Any] | None:
    """Inverse of :func:`encode_link`: the JSON object, or ``None`` (too large, not JSON, not an object)."""
    if len(raw) > MAX_LINK_BYTES:
        return None
    try:
        message = json.loads(raw)
    except ValueError:
        return None
    return message if isinstance(message, dict) else None
