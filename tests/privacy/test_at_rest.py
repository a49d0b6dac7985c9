"""At rest: after a real capture, encrypted caching and personalization, nothing readable is left on disk.

Threat model: someone who obtains the device's disk (theft, backup, another local user reading files) but not
the running agent's memory or the key-encryption key's protection (OS keyring or a 0600 file readable only by
the service user). They look for frames, face crops and plaintext features in every file the agent wrote: its
state directory (cache, models, budgets, sockets), its temp directory and its logs. After ``forget``/``purge``
they must find nothing decryptable either: neither the destroyed sessions' ciphertext nor keys that open it.

The agent runs for real (``fedfer-agent run``: capture → MediaPipe + MobileNetV2 → encrypted cache → learner)
on the real CREMA-D clips; H5's scanner (:mod:`agent.atrest_scan`) also searches for the exact bytes of every
feature the agent computed (read back through the cache API while the keys still exist).
"""

from __future__ import annotations

import sqlite3
import stat
import time
from pathlib import Path

import numpy as np
import pytest

from agent.atrest_scan import AtRestScanner
from agent.config import apply_path_overrides, parse_config
from agent.service import open_cache
from tests.agent.daemon_harness import Agent

pytestmark = pytest.mark.slow

SETTINGS = """
[capture]
source = "{clips}"
fps = 5
realtime = false
loop = false
[learning]
min_sessions = 1
epochs = 1
confidence_threshold = 0.0
[privacy]
dp = true
target_epsilon = 8.0
budget = 8.0
[daemon]
heartbeat_interval_s = 0.2
heartbeat_timeout_s = 60.0
start_timeout_s = 120.0
restart_backoff_s = 0.2
restart_backoff_max_s = 1.0
drain_timeout_s = 10.0
queue_hwm = 64
"""


def _is_model_file(path: Path) -> bool:
    """Whether ``path`` holds exactly the named arrays of ``v`` (a model, not features)."""
    from agent.models import VideoModel, to_named_arrays

    if path.suffix != ".npz":
        return False
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError):
        return False
    expected = {k: v.shape for k, v in to_named_arrays(VideoModel(num_classes=6)).items()}
    return bool(arrays) and {k: a.shape for k, a in arrays.items()} == expected


def _unexpected(report) -> list:  # type: ignore[no-untyped-def]
    """Findings other than the float runs of ``v``'s own weight file (weights are not features).

    Images, raw pixels, frame-sized files and the bytes of any computed feature count everywhere.
    """
    return [
        f
        for f in report.findings
        if not (f.kind in ("float32_run", "float16_run") and _is_model_file(f.path))
    ]


def _wait_settled(agent: Agent, timeout: float = 300.0) -> None:
    """Wait until the source is read, every frame went through vision into the cache, and all is sealed."""
    deadline = time.monotonic() + timeout
    last, stable_since = None, time.monotonic()
    while time.monotonic() < deadline:
        workers = agent.status()["workers"]
        cap, vis, lrn = (workers[r].get("stats", {}) for r in ("capture", "vision", "learner"))
        drained = (
            cap.get("source_done") is True
            and vis.get("frames_in", -1) >= cap.get("frames_sent", 0)
            and lrn.get("records_in", -1) >= vis.get("records_sent", 0)
        )
        listed = agent.client.request("sessions")["sessions"]
        now = (drained, len(listed), sum(x["frames"] for x in listed), all(x["sealed"] for x in listed))
        if now != last:
            last, stable_since = now, time.monotonic()
        elif drained and listed and now[3] and time.monotonic() - stable_since >= 2.0:
            return
        time.sleep(0.3)
    raise AssertionError(f"the cache did not settle: {last}")


def _files(*roots: Path) -> list[Path]:
    out = []
    for root in roots:
        if root.is_file():
            out.append(root)
        elif root.is_dir():
            out.extend(p for p in root.rglob("*") if p.is_file() or p.is_socket())
    return out


def test_capture_cache_personalize_leave_nothing_readable(
    tmp_path: Path, assets: Path, audit_report, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Real clips through the running agent; then scan, check key modes, forget, purge and scan again."""
    agent_tmp = tmp_path / "agent-tmp"
    agent_tmp.mkdir(mode=0o700)
    monkeypatch.setenv("TMPDIR", str(agent_tmp))  # the agent's temp files land where we can scan them
    config_path = tmp_path / "agent.toml"
    config_path.write_text(SETTINGS.format(clips=assets / "data" / "crema-d-sample"), encoding="utf-8")
    agent = Agent(tmp_path, config_path)
    config = apply_path_overrides(
        parse_config(config_path.read_text()), {"FEDFER_STATE_DIR": str(agent.state_dir)}
    )
    try:
        agent.start()
        # The whole source is read (loop = false), then every queued frame reaches the cache and is sealed.
        _wait_settled(agent)
        assert len(agent.client.request("sessions")["sessions"]) >= 6
        assert agent.client.request("personalize")["state"] == "running"
        status = agent.wait_for(lambda s: s["jobs"][-1]["state"] != "running", timeout=240)
        job = status["jobs"][-1]
        assert job["state"] == "done", job
        assert job["result"]["selected"] > 0, job  # v really was fine-tuned on the cached features

        cache = open_cache(config)
        try:
            sessions = cache.sessions()
            features = [r.feature for s in sessions for r in cache.read_session(s.session_id)]
        finally:
            cache.close()
        assert len(features) >= 30
        known = [np.asarray(f, dtype=np.float16) for f in features]

        roots = (agent.state_dir, agent_tmp, agent.log)
        scanner = AtRestScanner(known_vectors=known)
        report = scanner.scan(roots)
        written = _files(*roots)
        keyish = [p for p in written if p.suffix in (".kek", ".key", ".pem") or "key" in p.name.lower()]
        loose = [str(p.relative_to(tmp_path)) for p in keyish if stat.S_IMODE(p.stat().st_mode) & 0o077]
        audit_report.record(
            "at_rest_after_personalization",
            sessions=len(sessions),
            frames=len(features),
            files_scanned=report.files_scanned,
            findings=len(report.findings),
            unexpected_findings=len(_unexpected(report)),
            model_files_in_clear=sorted(
                {str(f.path.relative_to(tmp_path)) for f in report.findings if _is_model_file(f.path)}
            ),
            key_files=[str(p.relative_to(tmp_path)) for p in keyish],
            key_files_not_0600=loose,
            personalization=job.get("result", {}),
        )
        assert not _unexpected(report), report.summary()
        assert keyish, "expected the cache's key-encryption key file"
        assert not loose, loose

        # forget one session, then purge: the ciphertext and the keys that opened it are gone.
        db_path = agent.state_dir / "cache" / "features.sqlite"
        with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True) as conn:
            blobs = [bytes(b) for (b,) in conn.execute("SELECT blob FROM records LIMIT 200")]
            wrapped = [bytes(w) for (w,) in conn.execute("SELECT wrapped_dek FROM sessions")]
        conn.close()
        victim = sessions[0].session_id
        assert agent.client.request("forget", id=victim) == {"forgotten": victim}
        assert agent.client.request("purge", confirm=True)["purged"] == len(sessions) - 1
        assert agent.client.request("sessions")["sessions"] == []
        agent.stop()

        leftovers = b"".join(p.read_bytes() for p in _files(agent.state_dir, agent_tmp) if p.is_file())
        found_blobs = sum(1 for b in blobs if b[-48:] in leftovers)
        found_keys = sum(1 for w in wrapped if w[-32:] in leftovers)
        after = scanner.scan((agent.state_dir, agent_tmp, agent.log))
        cache = open_cache(config)
        try:
            remaining = cache.sessions()
        finally:
            cache.close()
        audit_report.record(
            "at_rest_after_forget_purge",
            record_ciphertexts_checked=len(blobs),
            record_ciphertexts_left=found_blobs,
            wrapped_keys_checked=len(wrapped),
            wrapped_keys_left=found_keys,
            sessions_left=len(remaining),
            findings=len(after.findings),
            unexpected_findings=len(_unexpected(after)),
        )
        assert found_blobs == 0 and found_keys == 0
        assert remaining == []
        assert not _unexpected(after), after.summary()
    finally:
        agent.kill()
