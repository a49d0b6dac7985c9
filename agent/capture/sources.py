"""The daemon's frame sources: ``[capture]`` as a sequence of segments, each read by a
:class:`~fedfer.agent.capture.video.VideoSource` and sampled to the configured rate.

A camera or stream is one segment; a folder is read file by file (sorted, :data:`VIDEO_SUFFIXES` only) and
each file is one segment; ``loop`` starts again at the end. A *finite* file source (files read once, see
:func:`file_source`) must lose nothing: the processed-files ledger (:mod:`fedfer.agent.capture.ledger`)
makes each file stored exactly once, every frame names its file and reading, and a :class:`SegmentEnd`
follows the last frame of every file read to its end.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from fedfer.agent.capture.ledger import ProcessedFiles
from fedfer.agent.capture.video import (
    VIDEO_SUFFIXES,
    Frame,
    SourceUnavailableError,
    TruncatedSourceError,
    VideoSource,
)
from fedfer.agent.config import AgentConfig
from fedfer.agent.files import ensure_private_dir
from fedfer.security.errors import ValidationError

__all__ = [
    "PROCESSED_FILE",
    "FrameSource",
    "SegmentEnd",
    "SourceSequence",
    "file_source",
    "open_source",
]

_log = logging.getLogger(__name__)

#: The processed-files ledger, inside the state directory.
PROCESSED_FILE = "capture-processed.json"


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
    """``capture.source`` as a sequence of segments (see the module docstring).

    A file that turns out truncated keeps the frames decoded before the cut; any other source failure ends the
    iteration with the capture error.

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
        self._current: VideoSource | None = None
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
            raise SourceUnavailableError("capture.source does not exist")
        return [str(path)]

    def __iter__(self) -> Iterator[Frame | SegmentEnd]:
        """Yield the sampled frames of every input in turn (again and again with ``loop``)."""
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
                self._current = VideoSource(source=item, sample_fps=self.fps, max_width=self.max_width)
                try:
                    for frame in self._current.frames():
                        last = float(frame.timestamp)
                        yield Frame(
                            index=count,
                            timestamp=last,
                            image=frame.image,
                            segment=segment,
                            due_s=offset + last,
                            file=key,
                            reading=reading,
                        )
                        count += 1
                except TruncatedSourceError:
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
