"""Still images as frames: a folder of photos read like a camera, one image per frame.

* :func:`read_image` decodes one image file with OpenCV into an RGB array (RAM only), or raises
  :class:`~fedfer.agent.capture.video.UnreadableFileError` for a file that is not a decodable image;
* :func:`image_runs` groups the images of a folder source into runs, each run one segment of the source and
  so one session: consecutive images (in name order) whose names give the same *session key*
  (:func:`session_key`), at most :data:`MAX_RUN_IMAGES` a run.

The session key is what ``capture.image_session_key`` (a regular expression) matches in the file name: its
first group if it has one, else the whole match; a name it does not match has the empty key. The empty
expression (the default) gives every image the empty key, so the images of a folder form one run.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fedfer.agent.capture.video import SourceUnavailableError, UnreadableFileError, to_rgb

__all__ = ["IMAGE_SUFFIXES", "MAX_RUN_IMAGES", "image_runs", "read_image", "session_key"]

#: What counts as an image in a folder source.
IMAGE_SUFFIXES = frozenset({".bmp", ".jpeg", ".jpg", ".png"})
#: A run longer than this goes on in a new segment (and session), so that a huge folder is stored, and marked
#: done in the processed-files ledger, a bounded piece at a time.
MAX_RUN_IMAGES = 1000


def read_image(path: Path, *, max_width: int | None) -> np.ndarray:
    """Decode the image file ``path`` as an RGB ``uint8`` array ``(H, W, 3)`` no wider than ``max_width``.

    Raises:
        SourceUnavailableError: the file does not exist (any more).
        UnreadableFileError: it exists but OpenCV cannot decode it as an image.
    """
    import cv2

    if not path.is_file():
        raise SourceUnavailableError(f"file {path.name} does not exist")
    # Read here and decoded from memory, so that a file that cannot be read and one that does not decode
    # are told apart.
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError:
        raise UnreadableFileError(path, "cannot be read") from None
    bgr = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if bgr is None or bgr.ndim != 3 or bgr.shape[2] != 3 or bgr.size == 0:
        raise UnreadableFileError(path, "is not a decodable image")
    return to_rgb(bgr, max_width)


def session_key(name: str, pattern: re.Pattern[str] | None) -> str:
    """The session key of the file name ``name`` under ``pattern`` (see the module docstring)."""
    if pattern is None:
        return ""
    found = pattern.search(name)
    if found is None:
        return ""
    return found.group(1) if pattern.groups else found.group(0)


def image_runs(files: Sequence[Path], pattern: re.Pattern[str] | None) -> list[tuple[str, list[Path]]]:
    """``(session key, images)`` of each run of consecutive images in ``files`` with the same session key.

    ``files`` is taken in the order given (the source sorts by name); a run is cut after
    :data:`MAX_RUN_IMAGES` images.
    """
    runs: list[tuple[str, list[Path]]] = []
    for file in files:
        key = session_key(file.name, pattern)
        if runs and runs[-1][0] == key and len(runs[-1][1]) < MAX_RUN_IMAGES:
            runs[-1][1].append(file)
        else:
            runs.append((key, [file]))
    return runs
