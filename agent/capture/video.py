"""Video capture with OpenCV: a camera index, a video file or a stream URL, sampled to a configured rate.

Frames exist only in RAM: they are decoded, converted to RGB and handed to the caller one at a time; nothing
here writes anything. Failures are :class:`CaptureError` subclasses with a message that names the source
kind, never a crash:

* :class:`SourceUnavailableError`: the camera/stream/file cannot be opened, or a live source stops delivering
  frames (a camera unplugged, a stream that drops);
* :class:`UnreadableFileError` (a :class:`SourceUnavailableError`): a file that exists is not something OpenCV
  can read (not a video, or no frame of it decodes); a folder source skips it (see
  :mod:`fedfer.agent.capture.sources`);
* :class:`TruncatedSourceError`: a file ends well before the frame count its container announces (the frames
  before the cut have already been yielded, so nothing decoded is lost).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from fedfer.security.errors import FedferError, ValidationError

__all__ = [
    "VIDEO_SUFFIXES",
    "CaptureError",
    "Frame",
    "SourceUnavailableError",
    "TruncatedSourceError",
    "UnreadableFileError",
    "VideoSource",
    "to_rgb",
]


#: What counts as a video file in a folder of them (a folder source, a corpus, the demo's clips).
VIDEO_SUFFIXES = frozenset({".avi", ".flv", ".m4v", ".mkv", ".mov", ".mp4", ".webm"})


class CaptureError(FedferError):
    """A video source failed (base class of the capture errors)."""


class SourceUnavailableError(CaptureError):
    """The source cannot be opened, or a live source stopped delivering frames."""


class UnreadableFileError(SourceUnavailableError):
    """A file exists but cannot be read as a video (or image): reading it again as it is would fail again.

    Attributes:
        reason: why, without the file's name (the message names it).
    """

    def __init__(self, source: str | Path, reason: str) -> None:
        super().__init__(f"{_describe(str(source))} {reason}")
        self.reason = reason


class TruncatedSourceError(CaptureError):
    """A video file ended before the frame count announced by its container."""


@dataclass(frozen=True, slots=True, repr=False)
class Frame:
    """One sampled frame (RAM only), and where it came from.

    A :class:`VideoSource` fills the first three fields; the daemon's sources
    (:mod:`fedfer.agent.capture.sources`) also say which stretch of the source, and which reading of which
    file, the frame belongs to.

    Attributes:
        index: position of the frame in what yielded it: among every decoded frame of a :class:`VideoSource`
            (0-based; sampling leaves gaps), among the frames of its segment for a daemon source (0, 1, ...;
            a gap there means a frame was lost).
        timestamp: seconds since the start of the source (file time for files, monotonic time for live
            sources) or, for a daemon source, of the segment.
        image: RGB ``uint8`` array ``(H, W, 3)``.
        segment: opaque id of the stretch of source the frame came from (one reading of a file, or one camera
            opening); ``""`` outside the daemon.
        due_s: seconds since the capture started at which a real-time capture sends it.
        file: ledger key of the file being read when the source is a finite file source (``None``: live).
        reading: monotonic stamp (ns) of this reading of ``file``; a later reading has a larger stamp.
    """

    index: int
    timestamp: float
    image: np.ndarray
    segment: str = ""
    due_s: float = 0.0
    file: str | None = None
    reading: int = 0

    def __repr__(self) -> str:
        # Frames are personal data: show their geometry, never their pixels.
        return f"Frame(index={self.index}, timestamp={self.timestamp:.3f}, shape={self.image.shape})"


def _describe(source: int | str) -> str:
    if isinstance(source, int):
        return f"camera {source}"
    if "://" in source:
        return "stream " + source.split("://", 1)[0] + "://…"  # never echo credentials in a URL
    return f"file {Path(source).name}"


class VideoSource:
    """An OpenCV video source sampled to ``sample_fps``.

    Use as a context manager (``with VideoSource(source=...) as src: for frame in src.frames(): ...``) so a
    camera is released on every path.

    Args:
        source: camera index (``int``), path of a video file, or stream URL (``rtsp://``, ``http(s)://``...).
        sample_fps: frames per second to keep (``None``: every frame). Frames are kept when their timestamp
            reaches the next sampling instant, so the kept rate never exceeds the source's.
        max_frames: stop after this many kept frames (``None``: until the source ends).
        max_width: frames wider than this are scaled down (aspect kept) before they are returned.
        truncation_tolerance: a file may end this fraction of its announced frame count early before it is
            reported as truncated (containers' counts are estimates).
        clock: monotonic clock for live sources (injectable for tests).
    """

    def __init__(
        self,
        *,
        source: int | str | Path,
        sample_fps: float | None = None,
        max_frames: int | None = None,
        max_width: int | None = None,
        truncation_tolerance: float = 0.05,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if isinstance(source, bool) or not isinstance(source, int | str | Path):
            raise ValidationError("source must be a camera index, a file path or a stream URL")
        if isinstance(source, int) and source < 0:
            raise ValidationError("camera index must be >= 0")
        if sample_fps is not None and not (isinstance(sample_fps, int | float) and 0 < sample_fps <= 240):
            raise ValidationError("sample_fps must lie in (0, 240]")
        if max_frames is not None and (type(max_frames) is not int or max_frames < 1):
            raise ValidationError("max_frames must be a positive int")
        if max_width is not None and (type(max_width) is not int or max_width < 16):
            raise ValidationError("max_width must be an int >= 16")
        if not 0.0 <= truncation_tolerance < 1.0:
            raise ValidationError("truncation_tolerance must lie in [0, 1)")
        self.source: int | str = source if isinstance(source, int) else str(source)
        self.live = isinstance(self.source, int) or "://" in self.source
        self.sample_fps = None if sample_fps is None else float(sample_fps)
        self.max_frames = max_frames
        self.max_width = max_width
        self.truncation_tolerance = truncation_tolerance
        self._clock = clock
        self._capture: Any = None
        self.native_fps = 0.0
        self.announced_frames = 0
        self.frames_decoded = 0

    def __repr__(self) -> str:
        return f"VideoSource({_describe(self.source)}, sample_fps={self.sample_fps})"

    def __enter__(self) -> VideoSource:
        self.open()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def open(self) -> None:
        """Open the source.

        Raises:
            SourceUnavailableError: missing file, unreadable container, absent camera or unreachable stream.
        """
        import cv2

        if self._capture is not None:
            return
        if not self.live and not Path(str(self.source)).is_file():
            raise SourceUnavailableError(f"{_describe(self.source)} does not exist")
        capture = cv2.VideoCapture(self.source)
        if not capture.isOpened():
            capture.release()
            if not self.live:
                raise UnreadableFileError(str(self.source), "cannot be opened as a video")
            raise SourceUnavailableError(f"{_describe(self.source)} cannot be opened")
        self._capture = capture
        fps = float(capture.get(cv2.CAP_PROP_FPS))
        self.native_fps = fps if math.isfinite(fps) and 0 < fps <= 1000 else 0.0
        count = float(capture.get(cv2.CAP_PROP_FRAME_COUNT))
        self.announced_frames = int(count) if not self.live and math.isfinite(count) and count > 0 else 0

    def close(self) -> None:
        """Release the camera, stream or file (idempotent)."""
        if self._capture is not None:
            self._capture.release()
            self._capture = None

    def frames(self) -> Iterator[Frame]:
        """Yield sampled RGB frames until the source ends, ``max_frames`` is reached or :meth:`close`.

        Raises:
            SourceUnavailableError: a live source stopped delivering frames (after the frames it did deliver).
            TruncatedSourceError: a file ended early (after every frame that could be decoded).
        """
        import cv2

        self.open()
        interval = 0.0 if self.sample_fps is None else 1.0 / self.sample_fps
        next_due = 0.0
        kept = 0
        start = self._clock()
        index = -1
        while self._capture is not None:
            # grab() decodes; retrieve() (colour conversion, copy) is paid only for frames that are kept.
            if not self._capture.grab():
                break
            index += 1
            self.frames_decoded += 1
            if self.live:
                t = self._clock() - start
            elif self.native_fps > 0:
                t = index / self.native_fps
            else:
                t = float(self._capture.get(cv2.CAP_PROP_POS_MSEC)) / 1000.0
            if t + 1e-9 < next_due:
                continue
            next_due = (math.floor(t / interval + 1e-9) + 1) * interval if interval else 0.0
            ok, bgr = self._capture.retrieve()
            if not ok or bgr is None:
                break
            yield Frame(index=index, timestamp=t, image=to_rgb(bgr, self.max_width))
            kept += 1
            if self.max_frames is not None and kept >= self.max_frames:
                return
        if self._capture is None:  # closed by the consumer
            return
        if self.live:
            raise SourceUnavailableError(f"{_describe(self.source)} stopped delivering frames")
        expected = self.announced_frames
        if expected and index + 1 < math.floor(expected * (1.0 - self.truncation_tolerance)):
            raise TruncatedSourceError(
                f"{_describe(self.source)} is truncated: {index + 1} of {expected} frames decodable"
            )
        if index < 0:
            raise UnreadableFileError(str(self.source), "holds no decodable frame")


def to_rgb(bgr: np.ndarray, max_width: int | None) -> np.ndarray:
    """An OpenCV BGR image as a contiguous RGB array, scaled down (aspect kept) to at most ``max_width``."""
    import cv2

    height, width = bgr.shape[:2]
    if max_width is not None and width > max_width:
        size = (max_width, max(1, round(height * max_width / width)))
        bgr = cv2.resize(bgr, size, interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
