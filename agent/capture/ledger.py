"""The capture ledgers: which files of a folder source are stored, and which cannot be read.

The processed-files ledger (:class:`ProcessedFiles`, ``capture-processed.json``) says which files a
non-looping file source has fully stored in the cache. Capture reads it to skip files already done; only the
learner writes it, and only once the cache holds every record of a file (the file's end-of-file marker
travelled through the pipeline behind its frames and the counts matched). While a file is being stored, the
ledger also names the cache sessions each *reading* of it (one pass of capture over the file, ordered by a
monotonic stamp) has begun, before the first record goes in. So after a crash anywhere, the next reading of a
half-stored file first forgets what the earlier readings stored: a file is cached exactly once, never partly
twice. A run of still images (:mod:`fedfer.agent.capture.images`) is read as one unit under a key of its own
(:func:`run_key`); when it is stored, each of its images is marked done.

The failed-files list (:class:`FailedFiles`, ``capture-failed.json``) says which files could not be read at
all (not a video, no decodable frame, not a decodable image) and why. Only capture writes it. A listed file
is skipped, by looping and non-looping sources alike, for as long as it is unchanged: it is tried once, not
again and again, and a file that changes afterwards (replaced, rewritten, a copy that finished) has another
key and is read again.

A file is identified by a SHA-256 over its resolved path, size and modification time (:func:`file_key`), so
neither ledger names a file. Both are rewritten atomically (0600, fsynced) on every change; a processed-files
ledger written by an older version (a plain list of done keys) is read.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from fedfer.security.files import write_atomic

__all__ = ["FailedFiles", "ProcessedFiles", "file_key", "run_key"]

_log = logging.getLogger(__name__)
_KEY_LEN = 64
_MAX_FAILED = 4096  # the failed-files list keeps the latest this many
_MAX_REASON = 200


def _is_key(value: object) -> bool:
    return isinstance(value, str) and len(value) == _KEY_LEN and all(c in "0123456789abcdef" for c in value)


def file_key(file: Path) -> str | None:
    """The ledgers' name for ``file`` as it is now (``None`` if it cannot be read)."""
    try:
        info = file.stat()
    except OSError:
        return None
    text = f"{file.resolve()}\0{info.st_size}\0{info.st_mtime_ns}"
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()


def run_key(folder: Path, session: str) -> str:
    """The processed-files ledger's name for a run of images of ``folder`` with the session key ``session``.

    Every reading of the run has it (whichever of its images are still to be stored), so a newer reading
    forgets what an interrupted one stored; it is never marked done itself (its images are), so images added
    to the run later are read as a new run.
    """
    text = f"image run\0{folder.resolve()}\0{session}"
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()


def _load(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        _log.warning("the %s is unreadable; starting a new one", what)
        return {}


class ProcessedFiles:
    """The ledger in ``path`` (see the module docstring).

    Attributes:
        path: the ledger file.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._done: set[str] = set()
        # file key -> [(reading stamp, cache session id)], in the order the sessions were begun
        self._partial: dict[str, list[tuple[int, str]]] = {}
        loaded = _load(path, "processed-files ledger")
        if isinstance(loaded, list):  # the first version: done keys only
            loaded = {"done": loaded}
        if isinstance(loaded, dict):
            self._done = {x for x in loaded.get("done", []) if _is_key(x)}
            partial = loaded.get("partial", {})
            if isinstance(partial, dict):
                for key, entries in partial.items():
                    if _is_key(key) and isinstance(entries, list):
                        self._partial[key] = [
                            (int(e[0]), str(e[1]))
                            for e in entries
                            if isinstance(e, list)
                            and len(e) == 2
                            and type(e[0]) is int
                            and isinstance(e[1], str)
                        ]

    def done(self, file: Path) -> bool:
        """Whether ``file`` (as it is now) was fully stored before."""
        key = file_key(file)
        return key is not None and key in self._done

    def is_done(self, key: str) -> bool:
        """Whether the file named ``key`` was fully stored."""
        return key in self._done

    def sessions(self, key: str) -> list[tuple[int, str]]:
        """``(reading, session id)`` of every session begun for the not-yet-done file ``key``."""
        return list(self._partial.get(key, []))

    def begin_session(self, key: str, reading: int, session_id: str) -> None:
        """Remember (durably, before any record goes in) that ``reading`` of ``key`` began ``session_id``."""
        self._partial.setdefault(key, []).append((reading, session_id))
        self._save()

    def drop_sessions(self, key: str, session_ids: set[str]) -> None:
        """Stop tracking ``session_ids`` of ``key`` (they were forgotten)."""
        kept = [e for e in self._partial.get(key, []) if e[1] not in session_ids]
        if kept:
            self._partial[key] = kept
        else:
            self._partial.pop(key, None)
        self._save()

    def mark_done(self, key: str, members: tuple[str, ...] = ()) -> None:
        """Record ``key`` as fully stored (for a run of images: its ``members``); its sessions are no longer
        partial."""
        self._done.update(members or (key,))
        self._partial.pop(key, None)
        self._save()

    def _save(self) -> None:
        data = {
            "done": sorted(self._done),
            "partial": {k: [list(e) for e in v] for k, v in sorted(self._partial.items())},
        }
        write_atomic(self.path, json.dumps(data).encode("utf-8"))


class FailedFiles:
    """The failed-files list in ``path`` (see the module docstring): file key → why it cannot be read.

    Attributes:
        path: the list's file (``None``: a list kept in memory only).
    """

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self._failed: dict[str, str] = {}
        loaded = _load(path, "failed-files list") if path is not None else {}
        failed = loaded.get("failed") if isinstance(loaded, dict) else None
        if isinstance(failed, dict):
            for key, why in failed.items():
                if _is_key(key) and isinstance(why, str):
                    self._failed[key] = why[:_MAX_REASON]

    def reason(self, key: str) -> str | None:
        """Why the file named ``key`` could not be read (``None``: it is not listed)."""
        return self._failed.get(key)

    def add(self, key: str, reason: str) -> None:
        """List the file named ``key`` as unreadable, for ``reason`` (kept in memory if the disk refuses)."""
        self._failed.pop(key, None)
        self._failed[key] = reason[:_MAX_REASON]
        while len(self._failed) > _MAX_FAILED:
            del self._failed[next(iter(self._failed))]
        if self.path is None:
            return
        try:
            write_atomic(self.path, json.dumps({"failed": self._failed}).encode("utf-8"))
        except OSError as exc:
            _log.warning(
                "the failed-files list could not be saved; it holds until capture restarts",
                extra={"reason": exc.strerror},
            )
