"""The learner's record sink: records in, cache sessions out, each file of a finite source stored once.

Vision tags every record with its session (:class:`~fedfer.agent.vision.sessions.SessionCutter`) and, for a
finite file source, with the reading of the file it came from (:class:`FileOrigin`); a :class:`FileEnd`
follows the last record of each reading. :class:`CacheSink` turns that stream into sealed sessions of the
encrypted cache and marks a file done in the processed-files ledger only when all of it is stored.
"""

from __future__ import annotations

import collections
import contextlib
import logging
from dataclasses import dataclass
from typing import Protocol

from fedfer.agent.capture.ledger import ProcessedFiles
from fedfer.agent.capture.sources import PROCESSED_FILE, file_source
from fedfer.agent.config import AgentConfig
from fedfer.agent.files import is_disk_full
from fedfer.agent.records import FrameRecord
from fedfer.agent.store.cache import FeatureCache
from fedfer.agent.store.device import open_cache
from fedfer.security.errors import FedferError

__all__ = ["CacheSink", "FileEnd", "FileOrigin", "RecordSink", "open_record_sink"]

_log = logging.getLogger(__name__)


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
        members: for a run of images, the ledger keys of its images (marked done instead of ``file``).
    """

    file: str
    reading: int
    complete: bool
    records: int
    members: tuple[str, ...] = ()


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

    With a ``ledger`` (finite file sources, see :mod:`fedfer.agent.capture.ledger`) records carry their file
    and reading:

    * the first record of a newer reading of a file forgets the sessions earlier readings stored (they were
      cut short: a crash, a restarted worker), and records of an older reading that arrive later are dropped;
    * every session is entered in the ledger before its first record is stored;
    * :meth:`end_file` seals the reading's sessions and marks the file done only if vision saw the whole
      reading and every record vision sent for it arrived here.
    """

    _KEEP_FORGOTTEN = 256

    def __init__(self, cache: FeatureCache, *, idle_s: float, ledger: ProcessedFiles | None = None) -> None:
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
            self._ledger.mark_done(end.file, end.members)
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
    """The learner's sink: the encrypted cache, with the ledger for finite file sources.

    Sessions that were begun but never received a record (a learner killed in between) are forgotten first.

    Raises:
        ComponentUnavailableError: the cache's key store is unusable.
    """
    cache = open_cache(config)
    for info in cache.sessions():
        if not info.sealed and info.frames == 0:
            with contextlib.suppress(FedferError):
                cache.forget(info.session_id)
    ledger = ProcessedFiles(config.state_dir / PROCESSED_FILE) if file_source(config) else None
    return CacheSink(cache, idle_s=config.vision.session_gap_s + 1.0, ledger=ledger)
