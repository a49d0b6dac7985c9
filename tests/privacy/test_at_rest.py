"""At rest: after a real capture, encrypted caching and personalization, nothing readable is left on disk.

Threat model: someone who obtains the device's disk (theft, backup, another local user reading files) but not
the running agent's memory or the key-encryption key's protection (OS keyring or a 0600 file readable only by
the service user). They look for frames, face crops and plaintext features in every file the agent wrote:
its state directory (cache, models, budgets, sockets, federation keys), its temp directory, its logs, its
home and cache folders (``HOME``, ``XDG_*``, ``FEDFER_CACHE_DIR`` all point into the test's folder for the
run) and shared memory (``/dev/shm``). After ``forget`` they must find nothing of the forgotten session that
could be decrypted -- neither its ciphertext nor its wrapped data key nor the key-encryption key that wrapped
it -- while the other sessions stay intact; after ``purge``, nothing of any session.

The agent runs for real (``fedfer-agent run``: capture → MediaPipe + MobileNetV2 → encrypted cache → learner)
on the real CREMA-D clips, after enrolling with a real aggregator (so its federation keys are on disk too).
"Written by the agent" means every file under those folders that is new or modified since just before the
agent started, found by walking them (not by name); key material is found by content (the KEK file's magic,
PEM private keys). The scanner (:mod:`fedfer.bench.atrest`) also searches for the exact bytes of every feature
the agent computed (read back through the cache API while the keys still exist).
"""

from __future__ import annotations

import datetime as dt
import os
import sqlite3
import stat
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedfer.agent.config import apply_path_overrides, parse_config
from fedfer.agent.federation.enroll import enroll
from fedfer.agent.store.cache import SessionNotFoundError
from fedfer.agent.store.device import load_personal_model, open_cache
from fedfer.aggregator.enrollment import issue_token
from fedfer.aggregator.rounds import RoundSettings
from fedfer.bench.atrest import AtRestScanner, ScanReport
from tests.agent.daemon_harness import Agent
from tests.integration.federation_harness import Harness, run_in_process

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
allow_untrained_ifer = true  # the audit is about what is written, not about the head's accuracy
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
KEK_MAGIC = b"FEDFERKEK1"
SHM = Path("/dev/shm")
MOBILENET = "models/mobilenet_v2_tflite/mobilenet_v2_1.0_224_quant.tflite"


def _is_model_file(path: Path) -> bool:
    """Whether ``path`` holds exactly the named arrays of ``v`` (a model, not features)."""
    from fedfer.agent.models.video import VideoModel, to_named_arrays

    if path.suffix != ".npz":
        return False
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError):
        return False
    expected = {k: v.shape for k, v in to_named_arrays(VideoModel(num_classes=6)).items()}
    return bool(arrays) and {k: a.shape for k, a in arrays.items()} == expected


class PublicWeights:
    """Recognizes the agent's cached conversion of the public MobileNetV2 weights (not user data).

    A file is accepted only if it loads (``weights_only``) to exactly what converting the public asset gives:
    the same keys and equal tensors, so it cannot hold anything else.
    """

    def __init__(self, assets: Path, scratch: Path) -> None:
        import torch

        from fedfer.agent.models.tflite import load_converted

        load_converted(assets / MOBILENET, cache_dir=scratch)
        (reference,) = scratch.glob("*.pt")
        self.reference = torch.load(reference, map_location="cpu", weights_only=True)

    def __call__(self, path: Path) -> bool:
        import torch

        if path.suffix != ".pt":
            return False
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # not a (safe) torch file at all
            return False

        def same(a: Any, b: Any) -> bool:
            if isinstance(a, dict) and isinstance(b, dict):
                return set(a) == set(b) and all(same(a[k], b[k]) for k in a)
            return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)

        return same(loaded, self.reference)


def _unexpected(report: ScanReport, public: PublicWeights) -> list[Any]:
    """Findings other than in model weights: float runs of ``v``'s own files, anything in the public f.

    Images, raw pixels, frame-sized files and the bytes of any computed feature count everywhere else.
    """
    verdicts: dict[Path, tuple[bool, bool]] = {}

    def kind_of(path: Path) -> tuple[bool, bool]:
        if path not in verdicts:
            verdicts[path] = (_is_model_file(path), public(path))
        return verdicts[path]

    out = []
    for f in report.findings:
        v_weights, public_weights = kind_of(f.path)
        if public_weights or (v_weights and f.kind in ("float32_run", "float16_run")):
            continue
        out.append(f)
    return out


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


Snapshot = dict[Path, tuple[int, int, int]]


def _snapshot(roots: list[Path]) -> Snapshot:
    """Every entry under ``roots`` (symlinks not followed) with its inode, size and modification time."""
    out: Snapshot = {}
    for root in roots:
        if not root.exists():
            continue
        if not root.is_dir():
            st = os.lstat(root)
            out[root] = (st.st_ino, st.st_size, st.st_mtime_ns)
            continue
        for dirpath, _dirs, names in os.walk(root, followlinks=False):
            for name in names:
                path = Path(dirpath) / name
                try:
                    st = os.lstat(path)
                except FileNotFoundError:
                    continue
                out[path] = (st.st_ino, st.st_size, st.st_mtime_ns)
    return out


def _written(before: Snapshot, roots: list[Path]) -> list[Path]:
    """Entries under ``roots`` that are new or changed since ``before``."""
    return sorted(p for p, meta in _snapshot(roots).items() if before.get(p) != meta)


def _regular(paths: list[Path]) -> list[Path]:
    return [p for p in paths if p.exists() and stat.S_ISREG(os.lstat(p).st_mode)]


def _key_files(paths: list[Path]) -> list[Path]:
    """Files holding key material, found by content: the cache's KEK file and PEM private keys."""
    keys = []
    for path in _regular(paths):
        head = path.read_bytes()[:4096]
        if head.startswith(KEK_MAGIC) or b"PRIVATE KEY-----" in head:
            keys.append(path)
    return keys


def _disk(paths: list[Path]) -> bytes:
    """Everything those files hold now (what a disk image would show of them)."""
    return b"".join(p.read_bytes() for p in _regular(paths))


def _enroll(tmp_path: Path, federation_dir: Path) -> None:
    """Enroll the device (its federation keys land in its state folder) with a real in-process aggregator."""

    async def body(h: Harness) -> None:
        await enroll(
            server=f"127.0.0.1:{h.server.enroll_port}",
            ca_pem=h.ca_pem,
            token=issue_token(h.storage, now=dt.datetime.now(dt.UTC)).token,
            state_dir=federation_dir,
        )

    run_in_process(tmp_path / "aggregator", RoundSettings(min_clients=2, max_clients=2), body)


def test_capture_cache_personalize_leave_nothing_readable(tmp_path: Path, assets: Path, audit_report) -> None:
    """Real clips through the running agent; scan all it wrote, check keys, forget, purge, scan again."""
    home, xdg, agent_cache, agent_tmp = (tmp_path / n for n in ("home", "xdg", "agent-cache", "agent-tmp"))
    runtime = tmp_path / "xdg-runtime"
    for folder in (home, xdg, agent_cache, agent_tmp, runtime):
        folder.mkdir(mode=0o700)
    env = {
        "HOME": str(home),
        "XDG_CACHE_HOME": str(xdg / "cache"),
        "XDG_CONFIG_HOME": str(xdg / "config"),
        "XDG_DATA_HOME": str(xdg / "data"),
        "XDG_STATE_HOME": str(xdg / "state"),
        "XDG_RUNTIME_DIR": str(runtime),
        "FEDFER_CACHE_DIR": str(agent_cache),
        "TMPDIR": str(agent_tmp),
    }
    config_path = tmp_path / "agent.toml"
    config_path.write_text(SETTINGS.format(clips=assets / "data" / "crema-d-sample"), encoding="utf-8")
    agent = Agent(tmp_path, config_path, env=env)
    roots = [agent.state_dir, agent.log, home, xdg, agent_cache, agent_tmp, runtime]
    public = PublicWeights(assets, tmp_path / "reference-weights")  # outside the scanned folders
    config = apply_path_overrides(
        parse_config(config_path.read_text()), {"FEDFER_STATE_DIR": str(agent.state_dir)}
    )
    before = _snapshot(roots)
    shm_before = set(os.listdir(SHM))
    shm_seen: set[str] = set()

    def shm_new() -> list[Path]:
        names = set(os.listdir(SHM)) - shm_before
        shm_seen.update(names)
        return [SHM / n for n in sorted(names)]

    agent.state_dir.mkdir(mode=0o700)
    _enroll(tmp_path, agent.state_dir / "federation")
    try:
        agent.start()
        # The whole source is read (loop = false), then every queued frame reaches the cache and is sealed.
        _wait_settled(agent)
        shm_mid = shm_new()
        assert len(agent.client.request("sessions")["sessions"]) >= 6
        assert agent.client.request("personalize")["state"] == "running"
        status = agent.wait_for(lambda s: s["jobs"][-1]["state"] != "running", timeout=240)
        job = status["jobs"][-1]
        assert job["state"] == "done", job
        assert job["result"]["selected"] > 0, job  # v really was fine-tuned on the cached features
        shm_end = shm_new()

        cache = open_cache(config)
        try:
            sessions = cache.sessions()
            features = [r.feature for s in sessions for r in cache.read_session(s.session_id)]
        finally:
            cache.close()
        assert len(features) >= 30
        # The personalized v is derived from the user's features: it is kept only inside the encrypted cache,
        # and the bytes of its weights must appear nowhere on disk either.
        stored = load_personal_model(config)
        assert stored is not None, "personalization saved no model"
        personal = [a.ravel() for a in stored[0].values() if a.size >= 16]
        scanner = AtRestScanner(known_vectors=[np.asarray(f, dtype=np.float16) for f in features] + personal)

        written = _written(before, roots)
        report = scanner.scan(_regular(written) + [p for p in {*shm_mid, *shm_end} if p.exists()])
        keys = _key_files(written)
        loose = [str(p.relative_to(tmp_path)) for p in keys if stat.S_IMODE(p.stat().st_mode) & 0o077]
        kek_files = [p for p in keys if p.read_bytes().startswith(KEK_MAGIC)]
        pem_keys = [p for p in keys if p not in kek_files]
        # No key material outside its own file: the KEK and each private key's body appear nowhere else.
        secrets = {p: p.read_bytes()[len(KEK_MAGIC) + 1 :] if p in kek_files else _pem_body(p) for p in keys}
        copies = {
            str(p.relative_to(tmp_path)): sum(
                1 for q in _regular(written) if q != p and secret in q.read_bytes()
            )
            for p, secret in secrets.items()
        }
        unexpected = _unexpected(report, public)
        audit_report.record(
            "at_rest_after_personalization",
            sessions=len(sessions),
            frames=len(features),
            files_written=len(_regular(written)),
            written=sorted(str(p.relative_to(tmp_path)) for p in written),
            files_scanned=report.files_scanned,
            bytes_scanned=report.bytes_scanned if hasattr(report, "bytes_scanned") else None,
            shm_entries_created=sorted(shm_seen),
            findings=len(report.findings),
            unexpected_findings=len(unexpected),
            weight_files_in_clear=sorted(
                {str(f.path.relative_to(tmp_path)) for f in report.findings if f not in unexpected}
            ),
            key_files=sorted(str(p.relative_to(tmp_path)) for p in keys),
            key_files_not_0600=loose,
            key_material_copies_elsewhere=copies,
            personalization=job.get("result", {}),
            personal_model_in_cache=True,
            personal_model_weight_vectors_searched=len(personal),
        )
        assert not unexpected, "\n".join(f"{f.path}:{f.offset}: {f.kind}" for f in unexpected)
        assert len(kek_files) == 1 and len(pem_keys) == 2, [
            str(p) for p in keys
        ]  # KEK, TLS and identity keys
        assert not loose, loose
        assert not any(copies.values()), copies
        # The derived cache (converted weights) went where the run pointed it: the scan covered it.
        assert any(p.is_relative_to(agent_cache) for p in written), "the agent wrote nothing to its cache dir"

        # forget one session: its ciphertext, wrapped key and the KEK that wrapped it are gone; others remain.
        db_path = agent.state_dir / "cache" / "features.sqlite"
        victim = sessions[0].session_id
        with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True) as conn:
            rows = conn.execute(
                "SELECT s.public_id, s.wrapped_dek, r.blob FROM records r JOIN sessions s ON r.sid = s.sid"
            ).fetchall()
        conn.close()
        victim_blobs = [bytes(b)[-48:] for sid, _, b in rows if sid == victim]
        other_blobs = [bytes(b)[-48:] for sid, _, b in rows if sid != victim]
        victim_wrapped = {bytes(w)[-32:] for sid, w, _ in rows if sid == victim}
        old_kek = secrets[kek_files[0]]
        assert victim_blobs and other_blobs and len(victim_wrapped) == 1
        # Forgetting a session also deletes the personalized v trained on it.
        assert agent.client.request("forget", id=victim) == {
            "forgotten": victim,
            "personal_model_deleted": True,
        }
        assert load_personal_model(config) is None
        disk = _disk(_written(before, roots))
        forgotten = {
            "victim_record_ciphertexts": len(victim_blobs),
            "victim_record_ciphertexts_left": sum(1 for b in victim_blobs if b in disk),
            "victim_wrapped_key_left": sum(1 for w in victim_wrapped if w in disk),
            "old_kek_left": int(old_kek in disk),
            # Teeth: the same search finds the sessions that were not forgotten.
            "other_record_ciphertexts": len(other_blobs),
            "other_record_ciphertexts_found": sum(1 for b in other_blobs if b in disk),
        }
        cache = open_cache(config)
        try:
            with pytest.raises(SessionNotFoundError):
                cache.read_session(victim)
            others_readable = sum(len(cache.read_session(s.session_id)) for s in sessions[1:])
        finally:
            cache.close()
        forgotten["other_frames_still_readable"] = others_readable
        audit_report.record("at_rest_after_forget", **forgotten)
        assert forgotten["victim_record_ciphertexts_left"] == 0, forgotten
        assert forgotten["victim_wrapped_key_left"] == 0 and forgotten["old_kek_left"] == 0, forgotten
        assert forgotten["other_record_ciphertexts_found"] == len(other_blobs), forgotten
        assert others_readable == len(features) - sessions[0].frames, forgotten

        # purge: nothing of any session is left, and the scan is clean again.
        kek_before_purge = kek_files[0].read_bytes()[len(KEK_MAGIC) + 1 :]
        assert agent.client.request("purge", confirm=True)["purged"] == len(sessions) - 1
        assert agent.client.request("sessions")["sessions"] == []
        agent.stop()
        written = _written(before, roots)
        disk = _disk(written)
        after = scanner.scan(_regular(written) + [p for p in shm_new() if p.exists()])
        cache = open_cache(config)
        try:
            remaining = cache.sessions()
        finally:
            cache.close()
        purged = {
            "record_ciphertexts_left": sum(1 for b in other_blobs if b in disk),
            "kek_before_purge_left": int(kek_before_purge in disk),
            "sessions_left": len(remaining),
            "findings": len(after.findings),
            "unexpected_findings": len(_unexpected(after, public)),
            "shm_entries_created": sorted(shm_seen),
        }
        audit_report.record("at_rest_after_purge", **purged)
        assert purged["record_ciphertexts_left"] == 0 and purged["kek_before_purge_left"] == 0, purged
        assert remaining == []
        assert not _unexpected(after, public), after.summary()
    finally:
        agent.kill()


def _pem_body(path: Path) -> bytes:
    """The base64 body of a PEM file's first block (a line from its middle is enough to recognize it)."""
    lines = [ln for ln in path.read_bytes().splitlines() if ln and not ln.startswith(b"-----")]
    return lines[len(lines) // 2]
