"""Where one session ends and the next begins: the one rule both the daemon and the vision pipeline use.

A session is a stretch of frames with a face. A new one starts with a new segment of the source, after a gap
of more than ``gap_s`` seconds without a face, or when time runs backwards (a source started again).
"""

from __future__ import annotations

import collections
import secrets

__all__ = ["SessionCutter"]


class SessionCutter:
    """Assigns faces to sessions, per segment (see the module docstring).

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

    def ended(self, segment: str, timestamp: float) -> bool:
        """Whether the session of ``segment`` is over at ``timestamp`` (no face for more than ``gap_s``)."""
        state = self._segments.get(segment)
        return state is not None and timestamp - state[1] > self.gap_s

    def end(self, segment: str) -> None:
        """Forget ``segment``'s session: its next face starts a new one."""
        self._segments.pop(segment, None)
