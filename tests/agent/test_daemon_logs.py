"""Structured logs never hold secrets, frames or features."""

from __future__ import annotations

import io
import json
import logging
import os

import numpy as np
import pytest

from fedfer.agent.daemon.logs import REDACTED, JsonFormatter, RedactingFilter, configure_logging, redact
from fedfer.agent.records import FrameRecord


@pytest.fixture()
def capture_log():  # type: ignore[no-untyped-def]
    stream = io.StringIO()
    logger = logging.getLogger("fedfer.test.logs")
    handler = logging.StreamHandler(stream)
    handler.addFilter(RedactingFilter())
    handler.setFormatter(JsonFormatter(role="test"))
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    yield logger, stream
    logger.removeHandler(handler)


def _lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_secrets_frames_and_features_never_reach_the_log(capture_log) -> None:  # type: ignore[no-untyped-def]
    logger, stream = capture_log
    key = os.urandom(32)
    frame = np.full((48, 64, 3), 173, dtype=np.uint8)
    feature = (np.arange(1280) % 97).astype(np.float16)
    record = FrameRecord(
        timestamp=1.0, feature=feature, ifer_probs=np.full(6, 1 / 6, np.float32), box=(1, 2, 3, 4), score=0.9
    )
    logger.info("derived key %s for %r", key, frame)
    logger.info("hex key %s", key.hex())
    extra = {"feature": feature.tolist(), "data_key": "abc", "count": 3, "frame": frame}
    logger.info("features", extra=extra)
    logger.info("record %s", record)
    logger.info("probs %s", feature)
    try:
        raise ValueError(f"bad {key.hex()}")
    except ValueError:
        logger.exception("failed")
    text = stream.getvalue()
    lines = _lines(stream)
    assert len(lines) == 6 and all(line["role"] == "test" for line in lines)
    assert key.hex() not in text and repr(key) not in text
    # The time stamp and pid are numbers of their own that may contain any digits: look at the rest.
    content = "\n".join(json.dumps({k: v for k, v in ln.items() if k not in ("ts", "pid")}) for ln in lines)
    assert "173" not in content  # no pixel value
    assert "96.0" not in content and "96, " not in content  # no feature value
    assert lines[2]["count"] == 3 and lines[2]["feature"] == REDACTED and lines[2]["data_key"] == REDACTED
    assert lines[5]["exc"] == f"ValueError: bad {REDACTED}"
    assert lines[3]["msg"] == f"record {REDACTED}"  # arbitrary objects are not rendered at all


def test_redact_keeps_plain_facts() -> None:
    assert redact(3) == 3 and redact(None) is None and redact(True) is True
    assert redact("worker exited") == "worker exited"
    assert redact({"worker": "vision", "secret": "x", "exit": -9}) == {
        "worker": "vision",
        "secret": REDACTED,
        "exit": -9,
    }
    assert redact(b"\x01\x02") == REDACTED
    assert redact(np.zeros(3)) == REDACTED
    assert redact("A" * 64) == REDACTED


def test_configure_logging_writes_private_json_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "logs" / "agent.jsonl"
    root = logging.getLogger()
    saved = list(root.handlers), root.level
    try:
        configure_logging(role="supervisor", level="info", log_file=str(path))
        logging.getLogger("agent.x").info("started %d workers", 3, extra={"token": "t0ps3cr3t"})
        for h in root.handlers:
            h.flush()
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
            h.close()
        for h in saved[0]:
            root.addHandler(h)
        root.setLevel(saved[1])
    assert path.stat().st_mode & 0o777 == 0o600
    line = json.loads(path.read_text().splitlines()[-1])
    assert line["msg"] == "started 3 workers" and line["role"] == "supervisor" and line["level"] == "info"
    assert "t0ps3cr3t" not in path.read_text()
