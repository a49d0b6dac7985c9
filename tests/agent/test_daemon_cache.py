"""The daemon and the encrypted cache: the learner's sink, and cache commands across kill -9 and restarts."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import zmq

from fedfer.agent.config import apply_path_overrides, parse_config
from fedfer.agent.daemon.control import ControlError
from fedfer.agent.daemon.wire import decode_file_end, decode_record, encode_file_end, encode_record
from fedfer.agent.records import FrameRecord
from fedfer.agent.store.cache import FeatureCache, SessionNotFoundError, _key_binding
from fedfer.agent.store.device import open_cache
from fedfer.agent.store.keys import FileKeyStore
from fedfer.agent.store.sink import CacheSink, FileEnd, FileOrigin
from fedfer.security.errors import IntegrityError
from tests.agent.daemon_harness import Agent, wait_gone, write_config


def _record(t: float, seed: int) -> FrameRecord:
    values = np.frombuffer(os.urandom(1280 * 2), dtype=np.uint16) % 1000
    return FrameRecord(
        timestamp=t,
        feature=(values.astype(np.float32) / 100.0 + seed).astype(np.float16),
        ifer_probs=np.full(6, 1 / 6, np.float32),
        box=(10.0, 20.0, 30.0, 40.0),
        score=0.9,
    )


def _snapshot(cache_dir: Path, dest: Path) -> Path:
    """A consistent copy of the cache database (SQLite backup) and of its key file as it is now."""
    dest.mkdir(mode=0o700)
    source = f"file:{cache_dir / 'features.sqlite'}?mode=ro"
    with (
        contextlib.closing(sqlite3.connect(source, uri=True)) as src,
        contextlib.closing(sqlite3.connect(dest / "features.sqlite")) as out,
    ):
        src.backup(out)
    shutil.copy(cache_dir / "cache.kek", dest / "old.kek")
    return dest


def _assert_unopenable(snapshot: Path, kek: Path) -> None:
    """No data key in the copy unwraps with the key file ``kek`` (its own key does); the copy cannot open."""
    with contextlib.closing(sqlite3.connect(snapshot / "features.sqlite")) as conn:
        cache_id = bytes(conn.execute("SELECT value FROM meta WHERE name = 'cache_id'").fetchone()[0])
        rows = conn.execute("SELECT public_id, wrapped_dek, sealed FROM sessions")
        # A sealed session's data key is bound to its id and its seal (fedfer.agent.store.cache._key_binding).
        wrapped = [(_key_binding(str(p), bool(sealed)), bytes(w)) for p, w, sealed in rows]
        assert conn.execute("SELECT COUNT(*) FROM records").fetchone()[0] > 0  # the ciphertext is all there
    assert wrapped
    current = FileKeyStore(kek).load()
    (old,) = FileKeyStore(snapshot / "old.kek").load()
    for session_id, blob in wrapped:
        old.unwrap_data_key(blob, cache_id=cache_id, session_id=session_id)  # the check is not vacuous
        for key in current:
            with pytest.raises(IntegrityError):
                key.unwrap_data_key(blob, cache_id=cache_id, session_id=session_id)
    shutil.copy(kek, snapshot / "cache.kek")
    with pytest.raises(IntegrityError, match="does not open this cache"):
        FeatureCache(snapshot)


def _config(state_dir: Path):  # type: ignore[no-untyped-def]
    return apply_path_overrides(parse_config(""), {"FEDFER_STATE_DIR": str(state_dir)})


def test_record_wire_form_round_trips_and_rejects_garbage() -> None:
    record = _record(1.5, 1)
    tag, back, origin = decode_record(encode_record("t1", record))  # type: ignore[misc]
    assert tag == "t1" and back.timestamp == 1.5 and back.score == pytest.approx(0.9) and origin is None
    assert np.array_equal(back.feature, record.feature) and back.box == record.box
    parts = encode_record("t1", record)
    assert decode_record(parts[:2]) is None
    assert decode_record([b"{", parts[1], parts[2]]) is None
    assert decode_record([parts[0], parts[1][:-2], parts[2]]) is None
    assert decode_record([parts[0], parts[1], b"\x00" * 3]) is None
    # Records of a finite file source name their file and reading; so does the end marker behind them.
    source = FileOrigin("ab" * 32, 123)
    assert decode_record(encode_record("t2", record, source))[2] == source  # type: ignore[index]
    bad = json.loads(encode_record("t2", record, source)[0])
    bad["reading"] = "123"
    assert decode_record([json.dumps(bad).encode(), parts[1], parts[2]]) is None
    end = FileEnd("ab" * 32, 123, complete=True, records=7)
    assert decode_file_end(encode_file_end(end)) == end
    assert decode_file_end(parts[:1]) is None and decode_file_end([b"[]"]) is None
    assert decode_file_end([*encode_file_end(end), b"x"]) is None


def test_cache_sink_maps_tags_to_sealed_sessions(tmp_path: Path) -> None:
    config = _config(tmp_path / "state")
    records = [_record(i * 0.1, i) for i in range(5)]
    sink = CacheSink(open_cache(config), idle_s=1.0)
    for r in records[:3]:
        sink.put("a", r, now=0.0)
    for r in records[3:]:
        sink.put("b", r, now=0.5)
    sink.idle(now=5.0)  # "b" idle for 4.5 s: sealed
    sink.close()
    cache = open_cache(config)
    try:
        infos = cache.sessions()
        assert [i.frames for i in infos] == [3, 2] and all(i.sealed for i in infos)
        stored = cache.read_session(infos[0].session_id) + cache.read_session(infos[1].session_id)
        assert [np.array_equal(a.feature, b.feature) for a, b in zip(stored, records, strict=True)] == [
            True
        ] * 5
    finally:
        cache.close()


@pytest.mark.slow
def test_cache_survives_kill_9_and_forget_purge_really_remove(tmp_path: Path, assets: Path) -> None:
    agent = Agent(tmp_path, write_config(tmp_path / "agent.toml", clips=assets / "data" / "crema-d-sample"))
    config = _config(agent.state_dir)
    agent.state_dir.mkdir(mode=0o700)
    records = {}
    cache = open_cache(config)
    for n in range(3):
        sid = cache.begin_session()
        batch = [_record(i * 0.2, n) for i in range(4)]
        cache.append_batch(sid, batch)
        cache.end_session(sid)
        records[sid] = batch
    cache.close()
    try:
        agent.start_paused()
        listed = agent.client.request("sessions")["sessions"]
        assert {s["id"] for s in listed} == set(records) and all(
            s["frames"] == s["verified"] == 4 for s in listed
        )
        counts = {
            "id",
            "created",
            "frames",
            "verified",
            "rejected",
            "damaged",
            "key_failed",
            "bytes",
            "sealed",
        }
        assert all(set(s) == counts for s in listed)  # metadata and counts, no contents
        assert not any(s["damaged"] or s["rejected"] for s in listed)

        # kill -9 the learner (the cache writer) and then the supervisor itself.
        learner = agent.worker_pid("learner")
        os.kill(learner, signal.SIGKILL)
        agent.wait_for(lambda s: s["workers"]["learner"]["restarts"] == 1)
        pids = [w["pid"] for w in agent.status()["workers"].values()]
        assert agent.proc is not None
        agent.proc.send_signal(signal.SIGKILL)
        agent.proc.wait(5)
        assert all(wait_gone(pid) for pid in pids)

        again = Agent(tmp_path, agent.config).start()
        try:
            listed = again.client.request("sessions")["sessions"]
            assert {s["id"] for s in listed} == set(records)
            cache = open_cache(config)
            try:
                for sid, batch in records.items():
                    back = cache.read_session(sid)
                    assert all(np.array_equal(a.feature, b.feature) for a, b in zip(back, batch, strict=True))
            finally:
                cache.close()

            cache_dir = agent.state_dir / "cache"
            kek = cache_dir / "cache.kek"
            before = kek.read_bytes()
            victim = sorted(records)[0]
            before_forget = _snapshot(cache_dir, tmp_path / "before-forget")
            assert again.client.request("forget", id=victim) == {
                "forgotten": victim,
                "personal_model_deleted": False,  # none was trained here
            }
            assert kek.read_bytes() != before  # the key that wrapped the victim's data key is gone
            assert victim not in {s["id"] for s in again.client.request("sessions")["sessions"]}
            cache = open_cache(config)
            try:
                with pytest.raises(SessionNotFoundError):
                    cache.read_session(victim)
            finally:
                cache.close()
            with pytest.raises(ControlError, match="no session"):
                again.client.request("forget", id=victim)
            # A copy of the database taken before the forget still holds the victim's wrapped key and records,
            # but nothing in it opens with the key material that remains.
            _assert_unopenable(before_forget, kek)

            # The learner has the cache open and is recording a session (records pushed into its queue, as
            # vision does) when the cache is purged.
            push = zmq.Context.instance().socket(zmq.PUSH)
            push.setsockopt(zmq.LINGER, 1000)
            push.connect(f"ipc://{agent.state_dir / 'run' / 'records.ipc'}")
            streamed = [_record(i * 0.2, 7) for i in range(3)]
            for record in streamed:
                push.send_multipart(encode_record("stream", record))
            again.wait_for(lambda s: s["workers"]["learner"]["stats"].get("records_cached", 0) >= 3)
            listed = again.client.request("sessions")["sessions"]
            assert len(listed) == 3 and [s["sealed"] for s in listed].count(False) == 1
            before_purge = _snapshot(cache_dir, tmp_path / "before-purge")
            keks = [before, kek.read_bytes()]
            assert again.client.request("purge", confirm=True) == {"purged": 3}
            keks.append(kek.read_bytes())
            assert again.client.request("sessions")["sessions"] == []
            _assert_unopenable(before_purge, kek)
            # The purged stream stays purged (the rest of it is discarded, not stored in a new session); the
            # next stream is stored under the new key and reads back.
            fresh = [_record(i * 0.2, 8) for i in range(2)]
            for record in streamed:
                push.send_multipart(encode_record("stream", record))
            for record in fresh:
                push.send_multipart(encode_record("fresh", record))
            push.close()
            stats = again.wait_for(
                lambda s: (
                    s["workers"]["learner"]["stats"].get("records_cached", 0) >= 5
                    and s["workers"]["learner"]["stats"].get("records_discarded", 0) >= 3
                )
            )["workers"]["learner"]["stats"]
            assert (stats["records_cached"], stats["records_discarded"]) == (5, 3)
            (only,) = again.client.request("sessions")["sessions"]
            cache = open_cache(config)
            try:
                back = cache.recover_session(only["id"]).records
                assert [r.feature.tobytes() for _, r in back] == [r.feature.tobytes() for r in fresh]
            finally:
                cache.close()
            # The logs (every process, JSON lines) hold no key and no feature.
            log = agent.log_text()
            lines = [line for line in log.splitlines() if line.strip()]
            assert lines and all(line.startswith("{") and json.loads(line)["msg"] for line in lines)
            for blob in [k[-32:] for k in keks] + [b[0].feature.tobytes()[:16] for b in records.values()]:
                for text in (blob.hex(), base64.b64encode(blob).decode(), repr(blob)):
                    assert text not in log
        finally:
            again.kill()
    finally:
        agent.kill()
