"""Bindings between the daemon's workers and the agent's components.

The workers in :mod:`agent.workers` only move data and keep time; what happens to the data is decided here:

* :class:`SourceSequence` reads a camera, a stream, a file or a folder of files through the capture
  component, sampled to the configured rate (frames are RGB ``uint8`` arrays kept in RAM).
* :func:`open_vision` binds the vision pipeline (faces → crop → MobileNetV2 → IFER) when it is installed.
* :func:`open_record_sink` binds the encrypted cache (:class:`CacheSink`, one cache session per session
  tag); :class:`SessionCutter` decides session boundaries.
* :data:`JOBS` maps control-plane jobs (``personalize``, ``join``) to the learning and federation code, and
  :func:`cache_sessions`, :func:`cache_forget`, :func:`cache_purge` serve the cache commands.

Components that are missing raise :class:`ComponentUnavailableError` with a clear message instead of being
imitated: the daemon keeps running and reports the stage as unavailable.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import importlib
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol, TypeVar

import numpy as np

from fedfer.agent.config import AgentConfig
from fedfer.agent.ledger import ProcessedFiles
from fedfer.agent.lock import ensure_private_dir
from fedfer.agent.paths import is_disk_full
from fedfer.agent.records import FEATURE_DIM, FrameRecord
from fedfer.security.errors import FedferError, ValidationError

__all__ = [
    "BUDGET_FILE",
    "CACHE_DIR",
    "FEDERATION_DIR",
    "JOBS",
    "MODELS_DIR",
    "PERSONAL_BLOB",
    "PROCESSED_FILE",
    "ROUND_BUDGET_FILE",
    "UNTRAINED_IFER",
    "VIDEO_SUFFIXES",
    "CacheSink",
    "ComponentUnavailableError",
    "FileEnd",
    "FileOrigin",
    "Frame",
    "FrameSource",
    "JobCancelledError",
    "ProcessedFiles",
    "RecordSink",
    "SegmentEnd",
    "SessionCutter",
    "SourceSequence",
    "VisionStage",
    "cache_forget",
    "cache_purge",
    "cache_sessions",
    "cancel_jobs",
    "computations_running",
    "decode_file_end",
    "decode_record",
    "encode_file_end",
    "encode_record",
    "file_source",
    "ifer_untrained",
    "load_personal_model",
    "open_cache",
    "open_record_sink",
    "open_source",
    "open_vision",
    "startup_warnings",
]

_log = logging.getLogger(__name__)
T = TypeVar("T")

# Where the daemon keeps things inside the state directory.
CACHE_DIR = "cache"
MODELS_DIR = "models"
#: The cache blob that holds the personalized ``v`` (never a plain file: it is derived from the user's data).
PERSONAL_BLOB = "personal-v"
FEDERATION_DIR = "federation"
BUDGET_FILE = "privacy-budget.json"
ROUND_BUDGET_FILE = "round-privacy-budget.json"
PROCESSED_FILE = "capture-processed.json"
VIDEO_SUFFIXES = frozenset({".avi", ".flv", ".m4v", ".mkv", ".mov", ".mp4", ".webm"})
_MAX_CLASSES = 16


class ComponentUnavailableError(FedferError):
    """A component the daemon would bind (vision, cache, learning, federation) is not installed or usable."""


def _component(module: str, what: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ComponentUnavailableError(f"{what} is not available ({module}: {exc.msg})") from None


# ------------------------------------------------------------------------------------------- capture


@dataclass(frozen=True, slots=True)
class Frame:
    """One sampled frame.

    Attributes:
        segment: opaque id of the stretch of source it came from (one reading of a file, or one camera
            opening).
        timestamp: seconds since the start of the segment.
        due_s: seconds since the capture started at which a real-time capture sends it.
        image: RGB ``uint8`` array ``(H, W, 3)``.
        file: ledger key of the file being read when the source is a finite file source (``None``: live).
        reading: monotonic stamp (ns) of this reading of ``file``; a later reading has a larger stamp.
        index: position of the frame in its segment (0, 1, ...).
    """

    segment: str
    timestamp: float
    due_s: float
    image: np.ndarray
    file: str | None = None
    reading: int = 0
    index: int = 0

    def __repr__(self) -> str:
        return f"Frame(timestamp={self.timestamp:.3f}, shape={self.image.shape})"


@dataclass(frozen=True, slots=True)
class SegmentEnd:
    """The end of one reading of a file: it was read to its end and yielded ``frames`` frames."""

    segment: str
    file: str
    reading: int
    frames: int


class FrameSource(Protocol):
    """An iterable of sampled frames (and, for files, end markers) that can be closed early."""

    def __iter__(self) -> Iterator[Frame | SegmentEnd]:
        """Yield frames in order; stop at the end of the source."""
        ...

    def close(self) -> None:
        """Release the device or file."""
        ...


class SourceSequence:
    """``capture.source`` as a sequence of segments, each read by the capture component (``agent.capture``).

    A folder is read file by file (sorted, video suffixes only) and each file is one segment; ``loop`` starts
    again at the end. A camera or stream is one segment. A file that turns out truncated keeps the frames
    decoded before the cut; any other source failure ends the iteration with the capture error.

    With a ``ledger`` (a finite file source: not looping) files already stored are skipped, each frame names
    its file and reading, and a :class:`SegmentEnd` follows the last frame of every file read to its end. The
    ledger is only read here: the learner marks a file done once its records are stored.
    """

    def __init__(
        self, *, source: str, fps: float, max_width: int, loop: bool, ledger: ProcessedFiles | None = None
    ) -> None:
        if fps <= 0 or max_width < 16:
            raise ValidationError("fps must be positive and max_width at least 16")
        self.source = source
        self.fps = fps
        self.max_width = max_width
        self.loop = loop
        self.ledger = ledger if not loop else None
        self._current: Any = None
        self._closed = False

    def _inputs(self) -> list[str | int]:
        if self.source.startswith("camera:"):
            return [int(self.source[len("camera:") :])]
        if "://" in self.source:
            return [self.source]
        path = Path(self.source)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file())
            if not files:
                raise ValidationError("capture.source folder holds no video files")
            return [str(p) for p in files]
        if not path.is_file():
            capture = _component("fedfer.agent.capture", "video capture")
            raise capture.SourceUnavailableError("capture.source does not exist")
        return [str(path)]

    def __iter__(self) -> Iterator[Frame | SegmentEnd]:
        """Yield the sampled frames of every input in turn (again and again with ``loop``)."""
        capture = _component("fedfer.agent.capture", "video capture")
        inputs = self._inputs()
        offset = 0.0
        while not self._closed:
            seen: set[str] = set()
            for item in inputs:
                key = None
                if self.ledger is not None and isinstance(item, str):
                    key = ProcessedFiles.key(Path(item))
                    if key is not None and (key in seen or self.ledger.is_done(key)):
                        continue  # stored already, or the same file a second time (through a link)
                    if key is not None:
                        seen.add(key)
                segment = secrets.token_hex(6)
                reading = time.monotonic_ns()
                last = 0.0
                count = 0
                self._current = capture.VideoSource(
                    source=item, sample_fps=self.fps, max_width=self.max_width
                )
                try:
                    for frame in self._current.frames():
                        last = float(frame.timestamp)
                        yield Frame(segment, last, offset + last, frame.image, key, reading, count)
                        count += 1
                except capture.TruncatedSourceError:
                    _log.warning("a video file ended early; its decodable frames were kept")
                finally:
                    self._current.close()
                    self._current = None
                if self._closed:
                    return
                if key is not None:
                    yield SegmentEnd(segment, key, reading, count)
                offset += last + 1.0 / self.fps
            if not self.loop:
                return

    def close(self) -> None:
        """Stop after the current frame and release the camera or file."""
        self._closed = True
        if self._current is not None:
            self._current.close()


def file_source(config: AgentConfig) -> bool:
    """Whether ``[capture]`` names a finite file source (files read once) rather than a live one.

    Finite sources must lose nothing: capture waits for room in the queue instead of dropping, and the ledger
    makes each file stored exactly once. Cameras, streams and looping files are live: a full queue drops the
    frame (counted), as a camera would have moved on anyway.
    """
    cap = config.capture
    return not cap.loop and not cap.source.startswith("camera:") and "://" not in cap.source


def open_source(config: AgentConfig) -> FrameSource:
    """The frame source ``[capture]`` describes (finite file sources skip files already stored)."""
    cap = config.capture
    ledger = None
    if file_source(config):
        ledger = ProcessedFiles(ensure_private_dir(config.state_dir) / PROCESSED_FILE)
    return SourceSequence(
        source=cap.source, fps=cap.fps, max_width=cap.max_width, loop=cap.loop, ledger=ledger
    )


# -------------------------------------------------------------------------------------------- vision


class VisionStage(Protocol):
    """Frame → :class:`FrameRecord` (or ``None`` when no face is found)."""

    def process(self, image: np.ndarray, timestamp: float) -> FrameRecord | None:
        """Run the pipeline on one RGB frame."""
        ...

    def close(self) -> None:
        """Release models."""
        ...


_UNTRAINED = (
    "the IFER head g is untrained (vision.ifer_model and vision.ifer_head are empty), so its pseudo labels "
    "are meaningless"
)
#: Why ``personalize``/``join`` refuse to run on an untrained IFER head, and what to do about it.
UNTRAINED_IFER = (
    f"{_UNTRAINED}: install an IFER export (fedfer-agent provision --ifer EXPORT, see "
    "docs/deploy-systemd.md) and set vision.ifer_model, or set learning.allow_untrained_ifer = true for "
    "experiments"
)


def ifer_untrained(config: AgentConfig) -> bool:
    """Whether the vision stage's IFER head would keep its random initialization (no export, no head file)."""
    return not config.vision.ifer_model and not config.vision.ifer_head


def startup_warnings(config: AgentConfig) -> list[str]:
    """What makes this configuration run but not do its job: an untrained IFER head, missing model files."""
    warnings = []
    if ifer_untrained(config):
        refused = "" if config.learning.allow_untrained_ifer else "; personalize and join are refused"
        warnings.append(_UNTRAINED + refused)
    vision = config.vision
    for key in ("detector_model", "ifer_model", "feature_weights", "ifer_head"):
        value = getattr(vision, key)
        if value and not config.model_path(value).exists():
            warnings.append(f"vision.{key} not found at {config.model_path(value)} (check FEDFER_ASSETS)")
    return warnings


def _require_trained_ifer(config: AgentConfig) -> None:
    """Refuse learning from pseudo labels of an untrained IFER head (unless the config opts in)."""
    if ifer_untrained(config) and not config.learning.allow_untrained_ifer:
        raise ValidationError(UNTRAINED_IFER)


def open_vision(config: AgentConfig) -> VisionStage:
    """Bind the vision pipeline (``agent.pipeline``).

    Raises:
        ComponentUnavailableError: the pipeline is not installed or cannot load its models.
    """
    pipeline = _component("fedfer.agent.pipeline", "the vision pipeline")
    factory = getattr(pipeline, "daemon_stage", None)
    if factory is None:
        raise ComponentUnavailableError(
            "the vision pipeline has no daemon binding (agent.pipeline.daemon_stage)"
        )
    stage: VisionStage = factory(config)
    return stage


class SessionCutter:
    """Assigns records to sessions: a new session starts with a new segment or after a gap without faces.

    Each segment keeps its own state (the last few), so records of two segments that arrive interleaved (a
    restarted capture's first frames behind its predecessor's last ones) never cut each other's sessions.
    """

    _KEEP = 16

    def __init__(self, *, gap_s: float) -> None:
        self.gap_s = gap_s
        self._segments: collections.OrderedDict[str, tuple[str, float]] = collections.OrderedDict()

    def tag(self, segment: str, timestamp: float) -> tuple[str, bool]:
        """Return ``(session tag, whether it is new)`` for a face seen at ``timestamp`` in ``segment``."""
        state = self._segments.pop(segment, None)
        new = state is None or timestamp - state[1] > self.gap_s or timestamp < state[1]
        tag = secrets.token_hex(8) if new or state is None else state[0]
        self._segments[segment] = (tag, timestamp)
        while len(self._segments) > self._KEEP:
            self._segments.popitem(last=False)
        return tag, new


@dataclass(frozen=True, slots=True)
class FileOrigin:
    """Which reading of which file (ledger key) a record came from."""

    file: str
    reading: int


@dataclass(frozen=True, slots=True)
class FileEnd:
    """Vision's account of one reading of a file, sent behind its last record.

    Attributes:
        file: the file's ledger key.
        reading: the reading's stamp.
        complete: vision received frames ``0 .. n-1`` of the reading (``n`` as capture counted them) and ran
            the vision stage on every one.
        records: records vision sent for the reading.
    """

    file: str
    reading: int
    complete: bool
    records: int


def _origin_fields(origin: FileOrigin | None) -> dict[str, Any]:
    return {} if origin is None else {"file": origin.file, "reading": origin.reading}


def encode_record(tag: str, record: FrameRecord, origin: FileOrigin | None = None) -> list[bytes]:
    """Wire form of one record for the vision → learner queue (RAM only)."""
    header = {
        "session": tag,
        "ts": record.timestamp,
        "box": list(record.box),
        "score": record.score,
        **_origin_fields(origin),
    }
    return [json.dumps(header).encode("utf-8"), record.feature.tobytes(), record.ifer_probs.tobytes()]


def _origin(header: dict[str, Any]) -> FileOrigin | None:
    if "file" not in header:
        return None
    file, reading = header["file"], header["reading"]
    if not isinstance(file, str) or len(file) != 64 or type(reading) is not int:
        raise ValueError("bad file origin")
    return FileOrigin(file, reading)


def decode_record(parts: Sequence[bytes]) -> tuple[str, FrameRecord, FileOrigin | None] | None:
    """Inverse of :func:`encode_record`: ``(tag, record, origin)``; ``None`` for anything malformed."""
    if len(parts) != 3 or len(parts[0]) > 4096 or len(parts[1]) != FEATURE_DIM * 2:
        return None
    if len(parts[2]) % 4 or not 0 < len(parts[2]) // 4 <= _MAX_CLASSES:
        return None
    try:
        header = json.loads(parts[0])
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
    """Wire form of a :class:`FileEnd` (one frame, so it cannot be mistaken for a record)."""
    header = {
        "end": True,
        "complete": end.complete,
        "records": end.records,
        **_origin_fields(FileOrigin(end.file, end.reading)),
    }
    return [json.dumps(header).encode("utf-8")]


def decode_file_end(parts: Sequence[bytes]) -> FileEnd | None:
    """Inverse of :func:`encode_file_end`; ``None`` for anything else."""
    if len(parts) != 1 or len(parts[0]) > 4096:
        return None
    try:
        header = json.loads(parts[0])
        origin = _origin(header)
        complete, records = header["complete"], header["records"]
    except (ValueError, TypeError, KeyError, AttributeError):
        return None
    if (
        header.get("end") is not True
        or origin is None
        or type(complete) is not bool
        or type(records) is not int
    ):
        return None
    return FileEnd(origin.file, origin.reading, complete, records)


# --------------------------------------------------------------------------------------------- cache


class RecordSink(Protocol):
    """Where the learner puts records: the encrypted cache, one cache session per session tag."""

    def put(self, tag: str, record: FrameRecord, *, now: float, origin: FileOrigin | None = None) -> bool:
        """Store one record in the session ``tag`` (opened on first use); whether it was stored."""
        ...

    def end_file(self, end: FileEnd) -> bool:
        """A reading of a file ended; whether the file is now recorded as fully stored."""
        ...

    def idle(self, now: float) -> None:
        """Close sessions that received nothing for a while."""
        ...

    def close(self) -> None:
        """Close every open session and the cache."""
        ...


def open_cache(config: AgentConfig) -> Any:
    """Open the encrypted feature cache in ``<state_dir>/cache`` with the configured retention and key store.

    Several processes may open it at once (the learner writes, the supervisor lists and forgets). The key
    store follows ``cache.key_store`` (:func:`agent.cache_keys.key_store_for`): with ``auto`` a new cache
    keeps its KEK in the OS keyring when one is usable, else in a 0600 file; an existing key file is kept.

    Raises:
        ComponentUnavailableError: the cache is not installed or its key store is unusable.
    """
    cache = _component("fedfer.agent.cache", "the encrypted cache")
    keys = _component("fedfer.agent.cache_keys", "the cache key store")
    directory = config.state_dir / CACHE_DIR
    try:
        key_store = keys.key_store_for(directory, config.cache.key_store)
    except FedferError as exc:
        raise ComponentUnavailableError(f"the cache key store is unusable ({exc})") from None
    return cache.FeatureCache(
        directory,
        key_store=key_store,
        max_age_s=config.cache.retention_days * 86_400.0,
        max_bytes=config.cache.max_bytes,
    )


class CacheSink:
    """A :class:`RecordSink` over the encrypted cache: one cache session per session tag.

    On a full disk :meth:`put` raises the ``OSError`` (``ENOSPC``; :func:`is_disk_full`): the record is not
    stored, everything stored before is kept, and for a finite file source the file is not marked done,
    so it is read again once there is room.

    A new tag seals the sessions before it (vision cuts one stream into consecutive sessions); a session
    that receives nothing for ``idle_s`` is sealed too. Every record is its own transaction, so a killed
    learner loses at most the record in flight; its unsealed session stays readable.

    A session forgotten (or purged) while it is still receiving records stays forgotten: the rest of its
    stream (its tag) is discarded, not stored in a new session, since it is the same stretch of video the
    user asked to delete.

    With a ``ledger`` (finite file sources, see :mod:`agent.ledger`) records carry their file and reading:

    * the first record of a newer reading of a file forgets the sessions earlier readings stored (they were
      cut short: a crash, a restarted worker), and records of an older reading that arrive later are dropped;
    * every session is entered in the ledger before its first record is stored;
    * :meth:`end_file` seals the reading's sessions and marks the file done only if vision saw the whole
      reading and every record vision sent for it arrived here.
    """

    _KEEP_FORGOTTEN = 256

    def __init__(self, cache: Any, *, idle_s: float, ledger: ProcessedFiles | None = None) -> None:
        self._cache = cache
        self._idle_s = idle_s
        self._ledger = ledger
        self._open: dict[str, tuple[str, float, FileOrigin | None]] = {}
        self._forgotten: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._readings: dict[str, int] = {}  # file -> newest reading seen
        self._received: dict[FileOrigin, int] = {}

    def put(self, tag: str, record: FrameRecord, *, now: float, origin: FileOrigin | None = None) -> bool:
        """Store ``record`` in the cache session of ``tag`` (begun on first use); whether it was stored."""
        if origin is not None and not self._accept(origin):
            return False
        if tag in self._forgotten:
            return False
        entry = self._open.get(tag)
        if entry is None:
            self._seal_all()
            session_id = self._cache.begin_session()
            if origin is not None and self._ledger is not None:
                self._ledger.begin_session(origin.file, origin.reading, session_id)
        else:
            session_id = entry[0]
        try:
            self._cache.append(session_id, record)
        except FedferError as exc:
            if is_disk_full(exc):
                raise  # the caller counts it; the session stays open for the next record
            # The session was forgotten or purged meanwhile (by the control plane).
            self._open.pop(tag, None)
            self._forget_tag(tag)
            _log.info("a session was forgotten while recording; the rest of its stream is discarded")
            return False
        self._open[tag] = (session_id, now, origin)
        return True

    def _accept(self, origin: FileOrigin) -> bool:
        """Count a record of ``origin``; drop it if its file is stored already or a newer reading started."""
        if self._ledger is not None and self._ledger.is_done(origin.file):
            return False
        newest = self._readings.get(origin.file)
        if newest is not None and origin.reading < newest:
            return False
        if newest is None or origin.reading > newest:
            self._readings[origin.file] = origin.reading
            self._forget_older_readings(origin)
        self._received[origin] = self._received.get(origin, 0) + 1
        return True

    def _forget_older_readings(self, origin: FileOrigin) -> None:
        for tag, (_, _, other) in list(self._open.items()):
            if other is not None and other.file == origin.file and other.reading < origin.reading:
                del self._open[tag]
                self._forget_tag(tag)
        if self._ledger is None:
            return
        stale = {sid for reading, sid in self._ledger.sessions(origin.file) if reading < origin.reading}
        for session_id in stale:
            with contextlib.suppress(FedferError):  # already gone (forgotten by the user, retention)
                self._cache.forget(session_id)
        if stale:
            self._ledger.drop_sessions(origin.file, stale)
            _log.info("a file is read again: the sessions an interrupted reading stored were forgotten")

    def _forget_tag(self, tag: str) -> None:
        self._forgotten[tag] = None
        while len(self._forgotten) > self._KEEP_FORGOTTEN:
            self._forgotten.popitem(last=False)

    def end_file(self, end: FileEnd) -> bool:
        """Seal the sessions of this reading; mark its file done if it arrived whole (see the class doc)."""
        origin = FileOrigin(end.file, end.reading)
        received = self._received.pop(origin, 0)
        newest = self._readings.get(end.file)
        if newest is not None and end.reading < newest:
            return False  # an older reading, superseded
        if self._ledger is not None and self._ledger.is_done(end.file):
            return False  # stored whole already (by another reading of the same file)
        for tag, (session_id, _, other) in list(self._open.items()):
            if other == origin:
                self._seal(session_id)
                del self._open[tag]
        if not end.complete or received != end.records:
            _log.warning(
                "a file was not stored whole; it will be read again",
                extra={"records_sent": end.records, "records_received": received, "complete": end.complete},
            )
            return False
        if self._ledger is not None:
            self._readings[end.file] = end.reading
            self._forget_older_readings(origin)
            self._ledger.mark_done(end.file)
        return True

    def idle(self, now: float) -> None:
        """Seal sessions idle for longer than ``idle_s``."""
        for tag, (session_id, last, _) in list(self._open.items()):
            if now - last > self._idle_s:
                self._seal(session_id)
                del self._open[tag]

    def _seal(self, session_id: str) -> None:
        # A session forgotten meanwhile has nothing left to seal.
        with contextlib.suppress(FedferError):
            self._cache.end_session(session_id)

    def _seal_all(self) -> None:
        for session_id, _, _ in self._open.values():
            self._seal(session_id)
        self._open.clear()

    def close(self) -> None:
        """Seal every open session and close the cache."""
        self._seal_all()
        self._cache.close()


def open_record_sink(config: AgentConfig) -> RecordSink:
    """The learner's sink: the encrypted cache (``agent.cache``), with the ledger for finite file sources.

    Sessions that were begun but never received a record (a learner killed in between) are forgotten first.

    Raises:
        ComponentUnavailableError: the cache is not installed.
    """
    cache = open_cache(config)
    for info in cache.sessions():
        if not info.sealed and info.frames == 0:
            with contextlib.suppress(FedferError):
                cache.forget(info.session_id)
    ledger = ProcessedFiles(config.state_dir / PROCESSED_FILE) if file_source(config) else None
    return CacheSink(cache, idle_s=config.vision.session_gap_s + 1.0, ledger=ledger)


def cache_sessions(config: AgentConfig) -> list[dict[str, Any]]:
    """The cached sessions: ids, creation times, frame counts, sizes; never their contents."""
    cache = open_cache(config)
    try:
        return [
            {
                "id": info.session_id,
                "created": info.created,
                "frames": info.frames,
                "bytes": info.bytes,
                "sealed": info.sealed,
            }
            for info in cache.sessions()
        ]
    finally:
        cache.close()


def cache_forget(config: AgentConfig, session_id: str) -> dict[str, Any]:
    """Delete one session and destroy its key (crypto-shredding; the cache also rotates its KEK).

    The personalized ``v`` was trained on the cached sessions, so it goes too: nothing learned from the
    forgotten session stays on the device (the next ``personalize`` trains a new one on what is left).
    """
    cache = open_cache(config)
    try:
        cache.forget(session_id)
        dropped = cache.delete_blob(PERSONAL_BLOB)
    finally:
        cache.close()
    dropped = _drop_plaintext_personal(config) or dropped
    return {"forgotten": session_id, "personal_model_deleted": dropped}


def cache_purge(config: AgentConfig) -> dict[str, Any]:
    """Delete every session and the personalized ``v``, and replace the key-encryption key."""
    cache = open_cache(config)
    try:
        count = len(cache.sessions())
        cache.purge()
    finally:
        cache.close()
    _drop_plaintext_personal(config)
    return {"purged": count}


def load_personal_model(config: AgentConfig) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
    """The personalized ``v`` (named arrays and manifest) from the encrypted cache; None if there is none.

    Raises:
        IntegrityError: the stored model failed verification.
    """
    export = _component("fedfer.agent.learning.export", "model files")
    cache_module = _component("fedfer.agent.cache", "the encrypted cache")
    cache = open_cache(config)
    try:
        data = cache.get_blob(PERSONAL_BLOB)
    except cache_module.BlobNotFoundError:
        return None
    finally:
        cache.close()
    arrays, meta = export.unpack_exported(data)
    return dict(arrays), dict(meta)


def _save_personal(config: AgentConfig, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    """Keep the personalized ``v`` only inside the encrypted cache (it is derived from the user's data)."""
    export = _component("fedfer.agent.learning.export", "model files")
    manifest = {"kind": "v", "classes": config.learning.num_classes, **meta}
    cache = open_cache(config)
    try:
        cache.put_blob(PERSONAL_BLOB, export.pack_exported("personal", arrays, manifest))
    finally:
        cache.close()
    _drop_plaintext_personal(config)


def _drop_plaintext_personal(config: AgentConfig) -> bool:
    """Remove a personalized ``v`` that an earlier version stored in the clear (``models/personal.*``)."""
    removed = False
    for suffix in (".npz", ".json"):
        path = config.state_dir / MODELS_DIR / f"personal{suffix}"
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed = True
    return removed


# ---------------------------------------------------------------------------------------------- jobs


def _cached_clips(config: AgentConfig) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Features ``(T, 1280)`` float32 and IFER probabilities ``(T, K)`` of every readable cached session."""
    cache = open_cache(config)
    features: list[np.ndarray] = []
    probs: list[np.ndarray] = []
    try:
        for info in cache.sessions():
            records = [r for _, r in cache.recover_session(info.session_id).records]
            if len(records) < 2:
                continue
            features.append(np.stack([r.feature for r in records]).astype(np.float32))
            probs.append(np.stack([r.ifer_probs for r in records]).astype(np.float32))
    finally:
        cache.close()
    if len(features) < config.learning.min_sessions:
        raise ValidationError(
            f"personalization needs at least {config.learning.min_sessions} cached session(s) of 2+ frames; "
            f"{len(features)} available"
        )
    return features, probs


def _personalize_from(
    config: AgentConfig, central: dict[str, np.ndarray]
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Personalize ``v`` from the ``central`` arrays on the cached sessions (DP-SGD when ``privacy.dp``)."""
    learning = _component("fedfer.agent.learning.personalize", "personalization")
    dp_module = _component("fedfer.agent.learning.dp", "differential privacy")
    models = _component("fedfer.agent.models", "the video model")
    features, probs = _cached_clips(config)
    privacy = config.privacy
    dp = budget = None
    if privacy.dp:
        dp = dp_module.DPConfig(
            target_epsilon=privacy.target_epsilon or None,
            noise_multiplier=privacy.noise_multiplier or None,
            delta=float(privacy.delta),
            max_grad_norm=privacy.max_grad_norm,
        )
        budget = dp_module.PrivacyBudget(
            path=config.state_dir / BUDGET_FILE, epsilon_limit=privacy.budget, delta=float(privacy.delta)
        )
    settings = learning.PersonalizeConfig(
        per_class=config.learning.max_per_class,
        p_threshold=config.learning.confidence_threshold,
        lr=float(config.learning.lr),
        epochs=config.learning.epochs,
    )
    model, result = learning.personalize(
        central,
        features,
        probs,
        num_classes=config.learning.num_classes,
        config=settings,
        dp=dp,
        budget=budget,
    )
    summary = {
        "sessions": len(features),
        "selected": int(result.selected),
        "per_class": [int(c) for c in result.per_class],
        "dp": privacy.dp,
        "epsilon": result.epsilon,
        "epsilon_total": result.epsilon_total,
        "seconds": round(float(result.seconds), 3),
    }
    arrays: dict[str, np.ndarray] = models.to_named_arrays(model)
    return arrays, summary


def _central_or_initial(config: AgentConfig) -> tuple[dict[str, np.ndarray], str]:
    """The last central ``v`` this device fetched, else a freshly initialized one."""
    export = _component("fedfer.agent.learning.export", "model files")
    manifest = config.state_dir / MODELS_DIR / "central.json"
    if manifest.is_file():
        arrays, meta = export.load_exported(manifest)
        return dict(arrays), str(meta.get("version", "central"))
    models = _component("fedfer.agent.models", "the video model")
    return dict(models.to_named_arrays(models.VideoModel(num_classes=config.learning.num_classes))), "initial"


def _save_model(config: AgentConfig, name: str, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    export = _component("fedfer.agent.learning.export", "model files")
    folder = ensure_private_dir(config.state_dir / MODELS_DIR)
    export.save_exported(folder, name, arrays, {"kind": "v", "classes": config.learning.num_classes, **meta})


def _personalize(config: AgentConfig) -> dict[str, Any]:
    """Job ``personalize``: fine-tune ``v`` on the cached sessions; the result stays on the device."""
    _require_trained_ifer(config)
    central, version = _central_or_initial(config)

    async def go() -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        return await _in_daemon_thread(_personalize_from, config, central)

    # Cancellable: a stopping agent does not wait for the training; nothing is saved unless it finished.
    arrays, summary = _run_cancellable(go())
    _save_personal(config, arrays, {"base_version": version})
    return {"base_version": version, **summary}


def _round_privacy(config: AgentConfig) -> tuple[Any, Any]:
    """``(RoundDPConfig, RoundBudget)`` for ``privacy.round_dp`` (``(None, None)`` when it is off).

    Raises:
        PrivacyBudgetExceededError: the device's round budget cannot pay for another round.
    """
    privacy = config.privacy
    if not privacy.round_dp:
        return None, None
    update = _component("fedfer.agent.learning.update", "user-level DP for rounds")
    delta = float(privacy.delta)
    if privacy.round_noise_multiplier > 0:
        dp = update.RoundDPConfig(
            clip_norm=float(privacy.round_clip_norm),
            noise_multiplier=float(privacy.round_noise_multiplier),
            num_clients=privacy.round_clients,
            delta=delta,
        )
    else:
        dp = update.RoundDPConfig.for_epsilon(
            epsilon=float(privacy.round_target_epsilon),
            clip_norm=float(privacy.round_clip_norm),
            num_clients=privacy.round_clients,
            delta=delta,
        )
    budget = update.RoundBudget(
        path=config.state_dir / ROUND_BUDGET_FILE, epsilon_limit=float(privacy.round_budget), delta=delta
    )
    budget.check(dp.noise_multiplier)
    return dp, budget


def _join(config: AgentConfig) -> dict[str, Any]:
    """Job ``join``: take part in one secure-aggregation round with a freshly personalized ``v``.

    The device must be enrolled (``fedfer-agent enroll --state <state_dir>/federation``). Within the round the
    central ``v`` of the round's base version is fetched, personalized on the cached sessions, and only the
    masked difference leaves the device: weighted by the number of clips used, or, with
    ``privacy.round_dp``, clipped in L2, with this device's share of the Gaussian noise and weight 1
    (:func:`agent.learning.update.round_contribution`). A device whose round budget is spent is refused
    before it contacts the aggregator.
    """
    _require_trained_ifer(config)
    if not config.federation.server:
        raise ValidationError("federation.server is not configured: this device does not federate")
    round_dp, round_budget = _round_privacy(config)
    client_module = _component("fedfer.agent.federation.client", "the federation client")
    state_module = _component("fedfer.agent.federation.state", "the federation client")
    try:
        state = state_module.DeviceState.load(config.state_dir / FEDERATION_DIR)
    except FedferError as exc:
        raise ComponentUnavailableError(
            f"{exc}; enroll with `fedfer-agent enroll --state {config.state_dir / FEDERATION_DIR} ...`"
        ) from None
    if state.target != config.federation.server:
        raise ValidationError("the device is enrolled with another aggregator than federation.server")
    try:
        ca_matches = Path(config.federation.ca).read_bytes().strip() == state.ca_pem().strip()
    except OSError:
        raise ValidationError("federation.ca cannot be read") from None
    if not ca_matches:
        raise ValidationError("the enrollment pinned a different CA than federation.ca")
    report: dict[str, Any] = {}
    holder: dict[str, Any] = {}

    async def update_fn(base_version: str, dim: int) -> tuple[np.ndarray, int]:
        central = await holder["client"].fetch_model(base_version)
        base = {k: np.asarray(v, dtype=np.float32) for k, v in central.arrays.items()}
        _save_model(config, "central", base, {"version": central.version})
        personal, summary = await _in_daemon_thread(_personalize_from, config, base)
        if set(personal) != set(base) or summary["selected"] < 1:
            raise ValidationError("no cached clip passed the confidence threshold; nothing to contribute")
        if sum(a.size for a in base.values()) != dim:
            raise ValidationError("the personalized model does not match the round's model")
        update_module = _component("fedfer.agent.learning.update", "round updates")
        update, weight, privacy_report = update_module.round_contribution(
            base,
            personal,
            order=list(base),
            examples=int(summary["selected"]),
            dp=round_dp,
            budget=round_budget,
        )
        report.update(summary, **privacy_report)
        return update, int(weight)

    async def go() -> Any:
        async with client_module.FederationClient(state=state) as opened:
            holder["client"] = opened
            outcome = await opened.join_round(update_fn, timeout_s=config.federation.round_timeout_s)
            # What this device put on the wire for the round (the later download is not part of it).
            counter = opened.counter
            report.update(
                wire_bytes=counter.total, wire_payload_bytes=counter.payload, wire_calls=counter.calls
            )
            if outcome.status == "published" and outcome.model_version:
                # Keep the newly published central v so the next `personalize` starts from it.
                latest = await opened.fetch_model(outcome.model_version)
                arrays = {k: np.asarray(v, dtype=np.float32) for k, v in latest.arrays.items()}
                _save_model(config, "central", arrays, {"version": latest.version})
                report["central_saved"] = str(latest.version)
            return outcome

    outcome = _run_cancellable(go())
    return {
        "round_id": int(outcome.round_id),
        "status": str(outcome.status),
        "model_version": str(outcome.model_version),
        "base_version": str(outcome.base_version),
        **report,
    }


async def _in_daemon_thread(fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn(*args)`` in a daemon thread and await its result.

    ``asyncio.to_thread`` would use the default executor, whose threads the interpreter joins at exit: a
    long personalization would then hold a stopping learner past its drain bound.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(value: T | None, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)  # type: ignore[arg-type]

    def work() -> None:
        try:
            value = fn(*args)
        except BaseException as exc:  # handed to the awaiting coroutine, which re-raises it
            with contextlib.suppress(RuntimeError):  # the loop is gone: the job was cancelled
                loop.call_soon_threadsafe(settle, None, exc)
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(settle, value, None)

    thread = threading.Thread(target=work, name="job-compute", daemon=True)
    with _running_lock:
        _computing.add(thread)
    thread.start()
    try:
        return await future
    finally:
        if not thread.is_alive():
            with _running_lock:
                _computing.discard(thread)


class JobCancelledError(FedferError):
    """A job was cancelled because the agent is stopping (nothing was sent or saved half-way)."""


_cancel = threading.Event()
_running: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Task[Any]]] = {}
_running_lock = threading.Lock()
_computing: set[threading.Thread] = set()


def computations_running() -> bool:
    """Whether a job's computation is still running (possibly abandoned by a cancelled job)."""
    with _running_lock:
        return any(t.is_alive() for t in _computing)


def _run_cancellable(coro: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(coro)``, cancelled at once (``JobCancelledError``) by :func:`cancel_jobs`."""

    async def main() -> T:
        task = asyncio.ensure_future(coro)
        with _running_lock:
            _running["job"] = (asyncio.get_running_loop(), task)
        if _cancel.is_set():
            task.cancel()
        try:
            return await task
        except asyncio.CancelledError:
            raise JobCancelledError("the job was cancelled: the agent is stopping") from None
        finally:
            with _running_lock:
                _running.pop("job", None)

    return asyncio.run(main())


def cancel_jobs() -> None:
    """Cancel the running job (the agent is stopping): its network calls end and its channel closes."""
    _cancel.set()
    with _running_lock:
        entry = _running.get("job")
    if entry is not None:
        loop, task = entry
        with contextlib.suppress(RuntimeError):  # the loop already finished
            loop.call_soon_threadsafe(task.cancel)


#: Control-plane jobs the learner worker runs, by name.
JOBS: dict[str, Callable[[AgentConfig], dict[str, Any]]] = {
    "join": _join,
    "personalize": _personalize,
}
