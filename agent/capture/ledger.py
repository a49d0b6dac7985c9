"""The processed-files ledger: which video files a non-looping file source has fully stored in the cache.

Capture reads it to skip files already done; only the learner writes it, and only once the cache holds every
record of a file (the file's end-of-file marker travelled through the pipeline behind its frames and the
counts matched). While a file is being stored, the ledger also names the cache sessions each *reading* of it
(one pass of capture over the file, ordered by a monotonic stamp) has begun, before the first record goes in.
So after a crash anywhere, the next reading of a half-stored file first forgets what the earlier readings
stored: a file is cached exactly once, never partly twice.

A file is identified by a SHA-256 over its resolved path, size and modification time (so the ledger names no
file, and a file replaced in place is read again). The file ``capture-processed.json`` is rewritten atomically
(0600, fsynced) on every change; a ledger written by an older version (a plain list of done keys) is read.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from fedfer.security.files import write_atomic

__all__ = ["ProcessedFiles"]

_log = logging.getLogger(__name__)
_KEY_LEN = 64


def _is_key(value: object) -> bool:
    return isinstance(value, str) and len(value) == _KEY_LEN and all(c in "0123456789abcdef" for c in value)


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
        try:
            loaded: Any = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            loaded = {}
        except (OSError, ValueError):
            _log.warning("the processed-files ledger is unreadable; starting a new one")
            loaded = {}
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

    @staticmethod
    def key(file: Path) -> str | None:
        """The ledger's name for ``file`` as it is now (``None`` if it cannot be read)."""
        try:
            info = file.stat()
        except OSError:
            return None
        text = f"{file.resolve()}\0{info.st_size}\0{info.st_mtime_ns}"
        return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()

    def done(self, file: Path) -> bool:
        """Whether ``file`` (as it is now) was fully stored before."""
        key = self.key(file)
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

    def mark_done(self, key: str) -> None:
        """Record ``key`` as fully stored; its sessions are no longer partial."""
        self._done.add(key)
        self._partial.pop(key, None)
        self._save()

    def _save(self) -> None:
        data = {
            "done": sorted(self._done),
            "partial": {k: [list(e) for e in v] for k, v in sorted(self._partial.items())},
        }
        write_atomic(self.path, json.dumps(data).encode("utf-8"))
