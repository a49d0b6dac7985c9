"""Structured JSON logs that never hold secrets, frames or features.

:class:`RedactingFilter` runs before any handler formats a record: it replaces arguments and ``extra``
fields that are binary or array data (keys, frames, features are all bytes or arrays) and fields whose
names say they are secret or personal, and it masks long hex/base64 runs in the message text. The
:class:`JsonFormatter` then writes one JSON object per line with a fixed set of safe fields.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

__all__ = ["JsonFormatter", "RedactingFilter", "capture_native_stderr", "configure_logging", "redact"]

REDACTED = "<redacted>"

# Names of extra fields whose values are never logged, whatever their type.
_SENSITIVE_NAME = re.compile(
    r"(key|secret|token|passw|private|seed|mask|share|cert|feature|embedding|frame|crop|image|pixel|probs|"
    r"plaintext|ciphertext|nonce)",
    re.IGNORECASE,
)
# Long hex or base64 runs look like key material or encoded data.
_BLOB = re.compile(r"(?:[0-9a-fA-F]{32,}|[A-Za-z0-9+/_-]{40,}={0,2})")
_MAX_TEXT = 2000

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD_ATTRS = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}


def _is_safe_scalar(value: object) -> bool:
    return value is None or type(value) in (bool, int, float)


def redact(value: object) -> object:
    """Return a loggable stand-in for ``value``.

    Numbers, booleans and ``None`` pass; strings pass with long hex/base64 runs masked and a length cap;
    flat lists/tuples/dicts of such values pass recursively; everything else (bytes, arrays, tensors,
    objects whose repr might carry data) becomes ``"<redacted>"``.
    """
    if _is_safe_scalar(value):
        return value
    if isinstance(value, str):
        text = _BLOB.sub(REDACTED, value)
        return text if len(text) <= _MAX_TEXT else text[:_MAX_TEXT] + "..."
    if isinstance(value, (list, tuple)) and len(value) <= 64:
        return [redact(v) for v in value]
    if isinstance(value, Mapping) and len(value) <= 64:
        return {str(k): (REDACTED if _SENSITIVE_NAME.search(str(k)) else redact(v)) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    return REDACTED


class RedactingFilter(logging.Filter):
    """A filter (attach it to handlers) that scrubs a record in place before it is formatted."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Scrub ``record``'s message, arguments, extra fields and exception; always keep the record."""
        if record.args:
            args = record.args if isinstance(record.args, tuple) else (record.args,)
            try:
                record.msg = str(record.msg) % tuple(redact(a) for a in args)
            except (TypeError, ValueError):
                record.msg = f"{record.msg} {REDACTED}"
            record.args = None
        record.msg = redact(str(record.msg))
        for name in list(record.__dict__):
            if name in _STANDARD_ATTRS:
                continue
            value = record.__dict__[name]
            record.__dict__[name] = REDACTED if _SENSITIVE_NAME.search(name) else redact(value)
        if record.exc_info and record.exc_info[1] is not None:
            # Tracebacks can quote local values; keep only the exception type.
            record.exc_text = f"{type(record.exc_info[1]).__name__}: {redact(str(record.exc_info[1]))}"
            record.exc_info = None
        record.stack_info = None
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts``, ``level``, ``logger``, ``msg``, the process's ``role``/``pid``,
    any (already redacted) extra fields, and ``exc`` when an exception was logged."""

    def __init__(self, *, role: str) -> None:
        super().__init__()
        self._role = role

    def format(self, record: logging.LogRecord) -> str:
        """Render ``record`` as a JSON line (run :class:`RedactingFilter` first)."""
        out: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "role": self._role,
            "pid": record.process,
            "msg": record.getMessage(),
        }
        for name, value in record.__dict__.items():
            if name not in _STANDARD_ATTRS and name not in out:
                out[name] = value if _is_safe_scalar(value) else redact(value)
        if record.exc_text:
            out["exc"] = record.exc_text
        return json.dumps(out, default=lambda _: REDACTED, ensure_ascii=True)


def configure_logging(
    *, role: str, level: str = "info", log_file: str = "", stream: TextIO | None = None
) -> None:
    """Send every log record of this process through the redacting filter to JSON lines.

    Args:
        role: ``supervisor`` or the worker's role, written into each line.
        level: ``debug``, ``info``, ``warning`` or ``error``.
        log_file: append to this file (created 0600) instead of ``stream``.
        stream: where to write when no file is given (standard error by default).
    """
    handler: logging.Handler
    if log_file:
        path = Path(log_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600, exist_ok=True)
        handler = logging.FileHandler(path, encoding="utf-8")
    else:
        handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(RedactingFilter())
    handler.setFormatter(JsonFormatter(role=role))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())


def capture_native_stderr() -> TextIO:
    """Route this process's file descriptor 2 through the JSON logs; return a stream for the log handler.

    Native libraries (MediaPipe, LiteRT, OpenCV) write plain text straight to descriptor 2. Each such line
    becomes a ``native`` log record (redacted like any other), so the process's output stays JSON lines.
    Call it before :func:`configure_logging` and pass the returned stream to it.
    """
    original = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")
    read_fd, write_fd = os.pipe()
    os.dup2(write_fd, 2)
    os.close(write_fd)
    sys.stderr = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")
    native = logging.getLogger("native")

    def pump() -> None:
        with os.fdopen(read_fd, "r", encoding="utf-8", errors="replace") as pipe:
            for line in pipe:
                if line.strip():
                    native.info(line.rstrip()[:_MAX_TEXT])

    threading.Thread(target=pump, name="native-stderr", daemon=True).start()
    return original
