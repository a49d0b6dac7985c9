"""The daemon's frame sources: ``[capture]`` as a sequence of segments, sampled to the configured rate.

A camera or stream is one segment. A folder is read in name order, its video files (:data:`VIDEO_SUFFIXES`)
and still images (:data:`~fedfer.agent.capture.images.IMAGE_SUFFIXES`) alike (other files are ignored): each
video file is one segment, read by a :class:`~fedfer.agent.capture.video.VideoSource`; each *run* of images
(consecutive images with the same session key, ``capture.image_session_key``; see
:mod:`fedfer.agent.capture.images`) is one segment of one frame per image, at ``fps`` frames a second. A
segment starts a new session (vision's :class:`~fedfer.agent.vision.sessions.SessionCutter`; it also cuts one
after ``vision.session_gap_s`` without a face). ``loop`` starts again at the end, reading the folder again.

A file that cannot be read (:class:`~fedfer.agent.capture.video.UnreadableFileError`: not a video, no
decodable frame, not a decodable image) is skipped: the source yields a :class:`FileFailed` and goes on with
the next file, and the failed-files list (:class:`~fedfer.agent.capture.ledger.FailedFiles`) keeps it from
being tried again until it changes. A file that vanishes, a camera that cannot be opened, a stream that
drops end the iteration with the capture error (the capture worker retries with backoff).

A *finite* file source (files read once, see :func:`file_source`) must lose nothing: the processed-files
ledger (:mod:`fedfer.agent.capture.ledger`) makes each file stored exactly once, every frame names its file
(or run) and reading, and a :class:`SegmentEnd` follows the last frame of every segment read to its end.
"""

from __future__ import annotations

import logging
import re
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from fedfer.agent.capture.images import IMAGE_SUFFIXES, image_runs, read_image
from fedfer.agent.capture.ledger import FailedFiles, ProcessedFiles, file_key, run_key
from fedfer.agent.capture.video import (
    VIDEO_SUFFIXES,
    Frame,
    SourceUnavailableError,
    TruncatedSourceError,
    UnreadableFileError,
    VideoSource,
)
from fedfer.agent.config import AgentConfig
from fedfer.agent.files import ensure_private_dir
from fedfer.security.errors import ValidationError

__all__ = [
    "FAILED_FILE",
    "PROCESSED_FILE",
    "FileFailed",
    "FrameSource",
    "SegmentEnd",
    "SourceSequence",
    "file_source",
    "open_source",
]

_log = logging.getLogger(__name__)

#: The processed-files ledger, inside the state directory.
PROCESSED_FILE = "capture-processed.json"
#: The failed-files list, inside the state directory.
FAILED_FILE = "capture-failed.json"


@dataclass(frozen=True, slots=True)
class SegmentEnd:
    """The end of one reading of a file (or run of images): read to its end, it yielded ``frames`` frames.

    Attributes:
        segment: the segment's id.
        file: the ledger key of the file, or of the run (:func:`~fedfer.agent.capture.ledger.run_key`).
        reading: the reading's stamp.
        frames: frames yielded (at least one).
        members: for a run, the ledger keys of the images that yielded them (empty for a video file).
    """

    segment: str
    file: str
    reading: int
    frames: int
    members: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class FileFailed:
    """A file of the source cannot be read and is skipped.

    Attributes:
        name: the file's name (no folder).
        reason: why (e.g. ``cannot be opened as a video``).
        known: it failed before, unchanged since, and was skipped without being tried again.
    """

    name: str
    reason: str
    known: bool


@dataclass(frozen=True, slots=True)
class _Video:
    path: str | int
    key: str | None  # the ledger key (a finite file source only)


@dataclass(frozen=True, slots=True)
class _Run:
    key: str | None  # the ledger key of the run (a finite file source only)
    images: tuple[tuple[Path, str | None], ...]  # (image, its file key)


class FrameSource(Protocol):
    """An iterable of sampled frames (and, for files, end markers and failures) that can be closed early."""

    def __iter__(self) -> Iterator[Frame | SegmentEnd | FileFailed]:
        """Yield frames in order; stop at the end of the source."""
        ...

    def close(self) -> None:
        """Release the device or file."""
        ...


class SourceSequence:
    """``capture.source`` as a sequence of segments (see the module docstring).

    A video file that turns out truncated keeps the frames decoded before the cut; an unreadable file is
    skipped (a :class:`FileFailed`, listed in ``failed``); any other source failure ends the iteration with
    the capture error. A looping source whose whole pass yields no frame raises
    :class:`~fedfer.agent.capture.video.SourceUnavailableError` rather than spinning.

    With a ``ledger`` (a finite file source: not looping) files and images already stored are skipped, each
    frame names its file (or run) and reading, and a :class:`SegmentEnd` follows the last frame of every
    segment read to its end. The ledger is only read here: the learner marks a file done once its records
    are stored.

    Args:
        source: ``capture.source``.
        fps: frames a second (sampled from videos; one image each ``1/fps`` s).
        max_width: wider frames are scaled down.
        loop: start again at the end.
        ledger: the processed-files ledger (ignored when looping).
        failed: the failed-files list (``None``: one in memory, for this object only).
        image_session_key: the compiled ``capture.image_session_key`` (``None``: one key for all images).
    """

    def __init__(
        self,
        *,
        source: str,
        fps: float,
        max_width: int,
        loop: bool,
        ledger: ProcessedFiles | None = None,
        failed: FailedFiles | None = None,
        image_session_key: re.Pattern[str] | None = None,
    ) -> None:
        if fps <= 0 or max_width < 16:
            raise ValidationError("fps must be positive and max_width at least 16")
        self.source = source
        self.fps = fps
        self.max_width = max_width
        self.loop = loop
        self.ledger = ledger if not loop else None
        self.failed = failed if failed is not None else FailedFiles()
        self.image_session_key = image_session_key
        self._current: VideoSource | None = None
        self._closed = False

    def _files(self) -> list[Path]:
        """The source's files, in the order they are read (raises for a source that is not there)."""
        path = Path(self.source)
        if path.is_dir():
            suffixes = VIDEO_SUFFIXES | IMAGE_SUFFIXES
            files = sorted(p for p in path.iterdir() if p.suffix.lower() in suffixes and p.is_file())
            if not files:
                raise ValidationError("capture.source folder holds no video or image files")
            return files
        if not path.is_file():
            raise SourceUnavailableError("capture.source does not exist")
        return [path]

    def _fail(self, path: Path, key: str | None, exc: UnreadableFileError) -> FileFailed:
        """Remember that ``path`` cannot be read (until it changes) and say so."""
        if key is not None:
            self.failed.add(key, exc.reason)
        return FileFailed(path.name, exc.reason, known=False)

    def _plan(self) -> Iterator[_Video | _Run | FileFailed]:
        """One pass over the source: its segments, and the files skipped because they failed before."""
        if self.source.startswith("camera:"):
            yield _Video(int(self.source[len("camera:") :]), None)
            return
        if "://" in self.source:
            yield _Video(self.source, None)
            return
        seen: set[str] = set()
        images: list[tuple[Path, str | None]] = []
        for file in self._files():
            key = file_key(file)
            reason = self.failed.reason(key) if key is not None else None
            if reason is not None:
                yield FileFailed(file.name, reason, known=True)
                continue
            if self.ledger is not None and key is not None:
                if key in seen or self.ledger.is_done(key):
                    continue  # stored already, or the same file a second time (through a link)
                seen.add(key)
            if file.suffix.lower() in IMAGE_SUFFIXES:
                images.append((file, key))
                continue
            yield from self._runs(images)
            images = []
            yield _Video(str(file), key if self.ledger is not None else None)
        yield from self._runs(images)

    def _runs(self, images: list[tuple[Path, str | None]]) -> Iterator[_Run]:
        keys = dict(images)
        folder = Path(self.source) if Path(self.source).is_dir() else Path(self.source).parent
        for session, run in image_runs([p for p, _ in images], self.image_session_key):
            key = run_key(folder, session) if self.ledger is not None else None
            yield _Run(key, tuple((p, keys[p]) for p in run))

    def __iter__(self) -> Iterator[Frame | SegmentEnd | FileFailed]:
        """Yield the sampled frames of every segment in turn (again and again with ``loop``)."""
        offset = 0.0
        while not self._closed:
            frames = 0
            for item in self._plan():
                if isinstance(item, FileFailed):
                    yield item
                    continue
                segment = secrets.token_hex(6)
                reading = time.monotonic_ns()
                count = 0
                last = 0.0
                members: list[str] = []
                for out in self._read(item, segment, reading, offset, members):
                    if isinstance(out, Frame):
                        count += 1
                        last = out.timestamp
                    yield out
                if self._closed:
                    return
                frames += count
                if item.key is not None and count:
                    yield SegmentEnd(segment, item.key, reading, count, tuple(members))
                if count:
                    offset += last + 1.0 / self.fps
            if not self.loop:
                return
            if not frames:
                raise SourceUnavailableError("capture.source holds no readable video or image file")

    def _read(
        self, item: _Video | _Run, segment: str, reading: int, offset: float, members: list[str]
    ) -> Iterator[Frame | FileFailed]:
        """The frames of one segment; ``members`` collects the keys of the run's images that gave a frame."""
        file = item.key
        count = 0
        if isinstance(item, _Run):
            for path, key in item.images:
                if self._closed:
                    return
                try:
                    image = read_image(path, max_width=self.max_width)
                except UnreadableFileError as exc:
                    yield self._fail(path, key, exc)
                    continue
                t = count / self.fps
                yield Frame(
                    index=count,
                    timestamp=t,
                    image=image,
                    segment=segment,
                    due_s=offset + t,
                    file=file,
                    reading=reading,
                )
                count += 1
                if key is not None:
                    members.append(key)
            return
        self._current = VideoSource(source=item.path, sample_fps=self.fps, max_width=self.max_width)
        try:
            for frame in self._current.frames():
                t = float(frame.timestamp)
                yield Frame(
                    index=count,
                    timestamp=t,
                    image=frame.image,
                    segment=segment,
                    due_s=offset + t,
                    file=file,
                    reading=reading,
                )
                count += 1
        except UnreadableFileError as exc:
            path = Path(str(item.path))
            yield self._fail(path, file_key(path), exc)
        except TruncatedSourceError:
            _log.warning("a video file ended early; its decodable frames were kept")
        finally:
            self._current.close()
            self._current = None

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
    """The frame source ``[capture]`` describes (finite file sources skip files already stored; every file
    source skips the files listed as unreadable in the state directory's failed-files list)."""
    cap = config.capture
    state = ensure_private_dir(config.state_dir)
    ledger = ProcessedFiles(state / PROCESSED_FILE) if file_source(config) else None
    return SourceSequence(
        source=cap.source,
        fps=cap.fps,
        max_width=cap.max_width,
        loop=cap.loop,
        ledger=ledger,
        failed=FailedFiles(state / FAILED_FILE),
        image_session_key=re.compile(cap.image_session_key) if cap.image_session_key else None,
    )
