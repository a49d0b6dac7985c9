"""Finite file sources are cached exactly once: back-pressure, end markers, the ledger, interrupted readings.

The unit tests drive the source and the learner's sink directly (real OpenCV, real encrypted cache); the
last test runs the real daemon on real clips, kills it mid-file with ``kill -9`` (every process), kills the
learner mid-run, and checks the cache against the face frames the detector finds in the same frames.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import time
from pathlib import Path

import numpy as np
import pytest

from fedfer.agent.capture.ledger import ProcessedFiles
from fedfer.agent.capture.sources import PROCESSED_FILE, SegmentEnd, SourceSequence, open_source
from fedfer.agent.capture.video import Frame
from fedfer.agent.config import apply_path_overrides, parse_config
from fedfer.agent.records import FrameRecord
from fedfer.agent.store.device import open_cache
from fedfer.agent.store.sink import CacheSink, FileEnd, FileOrigin, open_record_sink
from fedfer.agent.vision.sessions import SessionCutter
from tests.agent.daemon_harness import Agent, wait_gone
from tests.agent.folder_sources import config_detector

CLIPS = ("1001_DFA_HAP_XX.flv", "1001_DFA_SAD_XX.flv", "1001_DFA_ANG_XX.flv")


def _config(text: str, state_dir: Path, assets: Path | None = None):  # type: ignore[no-untyped-def]
    paths = {"FEDFER_STATE_DIR": str(state_dir)} | ({"FEDFER_ASSETS": str(assets)} if assets else {})
    return apply_path_overrides(parse_config(text), paths)


def _clips(tmp_path: Path, assets: Path, names: tuple[str, ...] = CLIPS) -> Path:
    folder = tmp_path / "clips"
    folder.mkdir()
    for name in names:
        shutil.copy(assets / "data" / "crema-d-sample" / name, folder / name)
    return folder


def _record(t: float) -> FrameRecord:
    values = np.frombuffer(os.urandom(1280 * 2), dtype=np.uint16) % 1000
    return FrameRecord(
        timestamp=t,
        feature=(values.astype(np.float32) / 100.0).astype(np.float16),
        ifer_probs=np.full(6, 1 / 6, np.float32),
        box=(1.0, 2.0, 3.0, 4.0),
        score=0.9,
    )


def test_file_sources_mark_each_file_end_and_skip_what_the_learner_stored(
    tmp_path: Path, assets: Path
) -> None:
    clips = _clips(tmp_path, assets, CLIPS[:2])
    state = tmp_path / "state"
    config = _config(f'[capture]\nsource = "{clips}"\nfps = 5\nloop = false\n', state)
    items = list(open_source(config))
    ends = [i for i in items if isinstance(i, SegmentEnd)]
    frames = [i for i in items if isinstance(i, Frame)]
    assert len(ends) == 2 and isinstance(items[-1], SegmentEnd)
    for end in ends:
        mine = [f for f in frames if f.segment == end.segment]
        assert [f.index for f in mine] == list(range(end.frames)) and end.frames >= 5
        assert {(f.file, f.reading) for f in mine} == {(end.file, end.reading)}
    assert ends[0].reading < ends[1].reading  # readings are ordered
    # Reading a file does not mark it done: only the learner does, once the file's records are stored.
    assert not (state / PROCESSED_FILE).exists()
    assert len(list(open_source(config))) == len(items)

    ledger = ProcessedFiles(state / PROCESSED_FILE)
    ledger.mark_done(ends[0].file)
    assert stat.S_IMODE((state / PROCESSED_FILE).stat().st_mode) == 0o600
    text = (state / PROCESSED_FILE).read_bytes()
    assert CLIPS[0].encode() not in text and str(clips).encode() not in text  # the ledger names no file
    again = list(open_source(config))
    assert {i.file for i in again} == {ends[1].file}
    # The same file twice in a folder (a link to it) is read once.
    (clips / "again.flv").symlink_to(clips / CLIPS[1])
    assert len([i for i in open_source(config) if isinstance(i, SegmentEnd)]) == 1
    (clips / "again.flv").unlink()
    # A file changed in place is new material.
    os.utime(clips / CLIPS[0], ns=(time.time_ns(), time.time_ns() + 10**9))
    assert len({i.file for i in open_source(config)}) == 2
    # Live sources (here a looping file) carry no file keys and no end markers.
    looping = iter(open_source(_config(f'[capture]\nsource = "{clips}"\nfps = 5\nloop = true\n', state)))
    first = next(looping)
    assert isinstance(first, Frame) and first.file is None


def test_cache_sink_stores_a_file_once_across_interrupted_readings(tmp_path: Path) -> None:
    config = _config("", tmp_path / "state")
    ledger_path = config.state_dir / PROCESSED_FILE
    key, other = "a" * 64, "b" * 64
    first, second = FileOrigin(key, 100), FileOrigin(key, 200)

    # A reading is cut short (the learner is killed: its sink is simply abandoned).
    sink = CacheSink(open_cache(config), idle_s=60.0, ledger=ProcessedFiles(ledger_path))
    for i in range(3):
        assert sink.put("t1", _record(i * 0.1), now=0.0, origin=first)
    (cut,) = [sid for _, sid in ProcessedFiles(ledger_path).sessions(key)]
    # The next learner starts; a newer reading of the same file forgets what the cut one stored.
    sink = CacheSink(open_cache(config), idle_s=60.0, ledger=ProcessedFiles(ledger_path))
    for i in range(4):
        assert sink.put("t2", _record(i * 0.1), now=0.0, origin=second)
    assert not sink.put("t1", _record(0.5), now=0.0, origin=first)  # a late record of the old reading
    cache = open_cache(config)
    assert [(s.frames, s.sealed) for s in cache.sessions()] == [(4, False)]
    assert cut not in {s.session_id for s in cache.sessions()}
    # Its end: vision saw the whole reading and every record arrived, so the file is done and sealed.
    assert sink.end_file(FileEnd(key, 200, complete=True, records=4))
    assert [(s.frames, s.sealed) for s in cache.sessions()] == [(4, True)]
    assert ProcessedFiles(ledger_path).is_done(key) and ProcessedFiles(ledger_path).sessions(key) == []
    # Once stored, a file takes nothing more (the same file read again through a link, a late reading).
    assert not sink.put("t5", _record(0.0), now=0.0, origin=FileOrigin(key, 250))
    assert not sink.end_file(FileEnd(key, 250, complete=True, records=1))
    assert [s.frames for s in cache.sessions()] == [4]

    # A reading vision did not see whole, or whose records did not all arrive, is not done.
    assert sink.put("t3", _record(0.0), now=0.0, origin=FileOrigin(other, 300))
    assert not sink.end_file(FileEnd(other, 300, complete=False, records=1))
    assert sink.put("t4", _record(0.0), now=0.0, origin=FileOrigin(other, 400))
    assert not sink.end_file(FileEnd(other, 400, complete=True, records=2))
    assert not ProcessedFiles(ledger_path).is_done(other)
    # The reading-300 session was superseded by reading 400 and forgotten; 400's stays until read again.
    assert len(cache.sessions()) == 2
    # A file without a single face is done with no session at all.
    assert sink.end_file(FileEnd("c" * 64, 500, complete=True, records=0))
    assert ProcessedFiles(ledger_path).is_done("c" * 64)

    # A session forgotten while it records stays forgotten: the rest of its stream is discarded, not
    # stored in a new session; the next stream (a new tag) is stored again.
    assert sink.put("live", _record(0.0), now=0.0)
    victim = cache.sessions()[-1].session_id
    cache.forget(victim)  # as the control plane does, through its own handle
    assert not sink.put("live", _record(0.1), now=0.0)
    assert victim not in {s.session_id for s in cache.sessions()} and len(cache.sessions()) == 2
    assert sink.put("next", _record(0.0), now=0.0)
    assert len(cache.sessions()) == 3
    sink.close()
    cache.close()


def test_the_learner_forgets_sessions_that_never_received_a_record(tmp_path: Path) -> None:
    config = _config("", tmp_path / "state")
    cache = open_cache(config)
    empty = cache.begin_session()  # a learner killed between beginning a session and its first record
    kept = cache.begin_session()
    cache.append(kept, _record(0.0))
    cache.close()
    sink = open_record_sink(config)
    sink.close()
    cache = open_cache(config)
    try:
        assert [s.session_id for s in cache.sessions()] == [kept]
    finally:
        cache.close()
    assert empty != kept


def test_sessions_of_two_segments_arriving_interleaved_are_not_cut(tmp_path: Path) -> None:
    cutter = SessionCutter(gap_s=1.0)
    a0, new_a = cutter.tag("a", 0.0)
    b0, new_b = cutter.tag("b", 0.0)
    a1, again_a = cutter.tag("a", 0.2)
    assert new_a and new_b and not again_a and a0 == a1 != b0
    assert cutter.tag("a", 5.0)[1]  # a gap without faces still starts a new session


# ------------------------------------------------------------------------------------- the real daemon


def _reference(config, clips: Path) -> list[tuple[float, ...]]:  # type: ignore[no-untyped-def]
    """The face frames of the same frames, cut into sessions: sorted timestamp tuples.

    The vision stage makes a record exactly for each frame the detector finds a face in (at the frame's
    timestamp), so the detector alone (real MediaPipe, the daemon's settings) gives what must be cached.
    """
    detector = config_detector(config)
    cutter = SessionCutter(gap_s=config.vision.session_gap_s)
    sessions: dict[str, list[float]] = {}
    try:
        source = SourceSequence(source=str(clips), fps=config.capture.fps, max_width=640, loop=False)
        for frame in source:
            assert isinstance(frame, Frame)
            if detector.detect(frame.image) is not None:
                sessions.setdefault(cutter.tag(frame.segment, frame.timestamp)[0], []).append(frame.timestamp)
    finally:
        detector.close()
    return sorted(tuple(round(t, 4) for t in ts) for ts in sessions.values())


def _cached(config) -> list[tuple[float, ...]]:  # type: ignore[no-untyped-def]
    cache = open_cache(config)
    try:
        return sorted(
            tuple(round(r.timestamp, 4) for r in cache.read_session(s.session_id)) for s in cache.sessions()
        )
    finally:
        cache.close()


def _done(state: Path) -> int:
    path = state / PROCESSED_FILE
    return len(json.loads(path.read_text())["done"]) if path.exists() else 0


DAEMON = """
[capture]
source = "{clips}"
fps = 5
realtime = {realtime}
loop = false
[learning]
allow_untrained_ifer = true
[daemon]
heartbeat_interval_s = 0.2
heartbeat_timeout_s = 20.0
start_timeout_s = 60.0
restart_backoff_s = 0.2
restart_backoff_max_s = 1.0
drain_timeout_s = 5.0
queue_hwm = 2
"""


@pytest.mark.slow
def test_kill_9_mid_file_and_a_killed_learner_neither_lose_nor_duplicate_a_record(
    tmp_path: Path, assets: Path
) -> None:
    clips = _clips(tmp_path, assets)
    config_path = tmp_path / "agent.toml"
    config_path.write_text(DAEMON.format(clips=clips, realtime="true"))
    agent = Agent(tmp_path, config_path)
    config = _config(config_path.read_text(), agent.state_dir, assets)
    try:
        # 1. Real time (5 frames/s): kill -9 every process of the agent while the first files are being read.
        agent.start()
        status = agent.wait_for(lambda s: s["workers"]["learner"]["stats"].get("records_cached", 0) >= 3, 90)
        assert not status["workers"]["capture"]["stats"]["source_done"]
        pids = [agent.proc.pid] + [w["pid"] for w in status["workers"].values()]  # type: ignore[union-attr]
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        assert all(wait_gone(pid) for pid in pids)
        agent.proc.wait(5)  # type: ignore[union-attr]
        assert _done(agent.state_dir) < len(CLIPS) and _cached(config)

        # 2. As fast as vision goes (capture waits for room: queue_hwm = 2). A vision that stops taking
        # frames holds capture back (it waits; nothing is dropped). Then kill -9 the learner mid-run.
        config_path.write_text(DAEMON.format(clips=clips, realtime="false"))
        agent.start()
        agent.wait_for(lambda s: s["workers"]["learner"]["stats"].get("records_cached", 0) >= 2, 90)
        vision = agent.worker_pid("vision")
        os.kill(vision, signal.SIGSTOP)
        try:
            held = agent.wait_for(
                lambda s: (
                    s["workers"]["capture"]["state"] == "blocked"
                    and s["workers"]["capture"]["stats"]["queue_full_waits"] > 0
                )
            )
        finally:
            os.kill(vision, signal.SIGCONT)
        assert held["workers"]["capture"]["stats"]["frames_dropped"] == 0
        assert held["workers"]["capture"]["heartbeat_age_s"] < 2  # waiting in bounded steps, heartbeating
        os.kill(agent.worker_pid("learner"), signal.SIGKILL)
        status = agent.wait_for(
            lambda s: (
                _done(agent.state_dir) == len(CLIPS)
                and s["workers"]["learner"]["restarts"] == 1
                and s["workers"]["capture"]["stats"].get("source_done") is True
            ),
            120,
        )
        log = agent.log_text()
        assert "restarting capture: a file being read is read again" in log
        capture = status["workers"]["capture"]["stats"]
        assert capture["frames_dropped"] == 0 and status["drops"] == {
            "frames": 0,
            "records": 0,
            "disk_full": 0,
        }
        assert status["workers"]["vision"]["stats"]["frames_discarded"] == 0
        assert agent.stop() == 0
        stored = _cached(config)
        expected = _reference(config, clips)
        assert stored == expected, (stored, expected)  # every face frame once: nothing lost, nothing twice

        # 3. A restart reads nothing again.
        agent.start()
        status = agent.wait_for(lambda s: s["workers"]["capture"]["stats"].get("source_done") is True)
        assert status["workers"]["capture"]["stats"]["frames_read"] == 0
        assert agent.stop() == 0
        assert _cached(config) == expected
    finally:
        agent.kill()
