"""Tampering with a device's cache file is detected and reported: by ``sessions``, ``personalize``, the logs.

The attacker edits the real ``cache/features.sqlite`` of a real daemon's state directory (with SQLite, as
someone holding the disk would): a flipped bit, two records swapped, records swapped across sessions, a cut
tail, an altered data key. The real ``fedfer-agent sessions`` and ``fedfer-agent personalize --wait`` command
lines say what verification rejected; the logs count it without naming any content.
"""

from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path

import pytest

from tests.agent.daemon_harness import Agent, fill_cache, write_config

pytestmark = pytest.mark.slow

SETTINGS = """
[learning]
min_sessions = 2
epochs = 1
allow_untrained_ifer = true  # synthetic cached sessions: the reporting is under test
[privacy]
dp = false
"""


def _tamper(database: Path) -> dict[str, int]:
    """Damage six of seven sessions; returns how many records of each id verification must reject."""
    conn = sqlite3.connect(database, isolation_level=None)
    try:
        sids = [r for r in conn.execute("SELECT sid, public_id FROM sessions ORDER BY created, sid")]
        assert len(sids) == 7

        def blob(sid: int, seq: int) -> bytes:
            (value,) = conn.execute(
                "SELECT blob FROM records WHERE sid = ? AND seq = ?", (sid, seq)
            ).fetchone()
            return bytes(value)

        def put(sid: int, seq: int, value: bytes) -> None:
            conn.execute("UPDATE records SET blob = ? WHERE sid = ? AND seq = ?", (value, sid, seq))

        (a, _), (b, _), (c, _), (d, _), (e, _), _, (g, _) = sids
        flipped = bytearray(blob(a, 1))
        flipped[40] ^= 0x01
        put(a, 1, bytes(flipped))  # one bit
        two, three = blob(b, 2), blob(b, 3)
        put(b, 2, three)  # two records of one session swapped
        put(b, 3, two)
        first_c, first_d = blob(c, 0), blob(d, 0)
        put(c, 0, first_d)  # records swapped across sessions
        put(d, 0, first_c)
        conn.execute(
            "DELETE FROM records WHERE sid = ? AND seq >= 3", (e,)
        )  # a cut tail: frames 3, 4 and the seal
        (wrapped,) = conn.execute("SELECT wrapped_dek FROM sessions WHERE sid = ?", (g,)).fetchone()
        altered = bytearray(wrapped)
        altered[-1] ^= 0x80
        conn.execute("UPDATE sessions SET wrapped_dek = ? WHERE sid = ?", (bytes(altered), g))  # its data key
        counts = (1, 2, 1, 1, 3, 0, 5)
        return {public_id: n for (_, public_id), n in zip(sids, counts, strict=True)}
    finally:
        conn.close()


def test_tampered_cache_records_are_counted_by_sessions_personalize_and_the_logs(
    tmp_path: Path, assets: Path
) -> None:
    """Issue 12 finding 6: before, `sessions` showed every session intact and `personalize` just said done."""
    config = write_config(tmp_path / "agent.toml", clips=assets / "data" / "crema-d-sample", extra=SETTINGS)
    agent = Agent(tmp_path, config)
    agent.state_dir.mkdir(mode=0o700)
    fill_cache(config.read_text(), agent.state_dir, sessions=7, frames=5)
    try:
        agent.start_paused()
        assert "DAMAGED" not in agent.cli("sessions")
        assert agent.stop() == 0
        rejected = _tamper(agent.state_dir / "cache" / "features.sqlite")
        agent.start_paused()

        cut, intact, keyless = list(rejected)[4:]
        text = agent.cli("sessions")
        lines = text.splitlines()
        assert lines[0] == "7 cached session(s), 6 DAMAGED (13 record(s) rejected, never used)"
        by_id = {line.split()[0]: line for line in lines[1:]}
        assert "5 frames stored, 3 verified, sealed" in by_id[cut]
        assert by_id[cut].endswith("DAMAGED: 3 record(s) failed verification or are missing")
        assert "5 frames stored, 5 verified, sealed" in by_id[intact] and "DAMAGED" not in by_id[intact]
        assert "5 frames stored, 0 verified" in by_id[keyless]
        assert by_id[keyless].endswith("DAMAGED: its data key failed verification")

        listed = {s["id"]: s for s in agent.client.request("sessions")["sessions"]}
        assert {sid: s["rejected"] for sid, s in listed.items()} == rejected
        for sid, s in listed.items():
            assert (
                s["frames"] == 5
                and s["damaged"] is (rejected[sid] > 0)
                and s["key_failed"] is (sid == keyless)
            )
        assert listed[cut]["verified"] == 3  # the cut session: 5 frames stored, 3 verified
        assert [s["verified"] for s in listed.values()] == [4, 3, 4, 4, 3, 5, 0]

        done = agent.cli("personalize", "--wait", timeout=180)
        assert done.startswith("personalize done: ")
        assert "records_rejected 13" in done and "sessions_damaged 6" in done and "sessions 6" in done
        assert (
            "warning: 13 cached record(s) of 6 damaged session(s) failed verification and were not used"
            in done
        )
        assert "failed verification and were not used" in agent.cli("status")
        job = agent.status()["jobs"][-1]["result"]
        # Six sessions still have 2+ verified frames to learn from; the seventh has none.
        assert (job["records_rejected"], job["sessions_damaged"], job["sessions"]) == (13, 6, 6)

        # The logs count what was rejected (the supervisor's listing, the learner's job) and name no content.
        log = agent.log_text()
        entries = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
        warned = [e for e in entries if "failed verification" in e.get("msg", e.get("message", ""))]
        roles = {e.get("role") for e in warned}
        assert {"supervisor", "learner"} <= roles, roles
        summary = [e for e in warned if e.get("records_rejected") is not None]
        assert summary and summary[-1]["records_rejected"] == 13 and summary[-1]["sessions_damaged"] == 6
        assert any("record(s) failed verification or are missing" in str(e) for e in warned)
        assert any("its data key failed verification" in str(e) for e in warned)
        assert not re.search(
            r"[0-9a-f]{32}", json.dumps(warned)
        )  # no ids in full, no key or ciphertext bytes
        assert agent.stop() == 0
    finally:
        agent.kill()
