"""The README's main command, ``python -m fedfer.bench.demo`` (``make demo``), run for real on the CREMA-D
clips.

One aggregator and three ``fedfer-agent run`` daemons as separate processes: real capture, MediaPipe and
MobileNetV2, encrypted caches, two secure-aggregation rounds over mutual TLS. The summary is checked against
what the aggregator's database and the devices' state directories hold, read independently here.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedfer.agent.config import apply_path_overrides, load_config
from fedfer.agent.store.device import open_cache
from fedfer.aggregator.registry import ModelRegistry
from fedfer.aggregator.storage import open_storage
from fedfer.bench.atrest import scan_paths
from fedfer.bench.demo import DemoConfig, split_clips
from fedfer.security.errors import ValidationError
from fedfer.security.secagg import Stage

pytestmark = pytest.mark.slow


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            return fh.read().split(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def _as_from_a_terminal() -> None:
    """Ctrl-C's default disposition in the child, as a terminal gives it: pytest itself may run in the
    background, where the shell hands every process SIGINT already ignored (and Python keeps it so)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _demo(workdir: Path, assets: Path, *extra: str) -> subprocess.Popen[str]:
    env = {**os.environ, "FEDFER_ASSETS": str(assets), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "fedfer.bench.demo", "--workdir", str(workdir), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        preexec_fn=_as_from_a_terminal,
    )


def _cached_features(agent: dict[str, Any]) -> list[np.ndarray]:
    """First feature of each session, decrypted through the device's own cache and key."""
    config = apply_path_overrides(
        load_config(Path(agent["config"])), {"FEDFER_STATE_DIR": agent["state_dir"]}
    )
    cache = open_cache(config)
    try:
        out = []
        for info in cache.sessions():
            records = cache.recover_session(info.session_id).records
            out.append(np.asarray(records[0][1].feature, dtype=np.float32))
        return out
    finally:
        cache.close()


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A fresh folder with a short path (the agents' AF_UNIX sockets live below it)."""
    path = Path(tempfile.mkdtemp(prefix="fedfer-demo-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_demo_runs_a_real_federation_and_reports_what_left_each_device(short_dir: Path, assets: Path) -> None:
    summary_path = short_dir / "summary.json"
    proc = _demo(short_dir / "demo", assets, "--dp", "--epsilon", "3", "--json-summary", str(summary_path))
    out, _ = proc.communicate(timeout=540)
    assert proc.returncode == 0, out[-4000:]
    summary = json.loads(summary_path.read_text())
    assert summary["ok"] is True and summary["problems"] == []
    agg = summary["aggregator"]
    agents = summary["agents"]
    device_ids = sorted(a["device_id"] for a in agents)

    # Two rounds published, each aggregating all three devices, each publishing a new central v.
    assert [r["status"] for r in agg["rounds"]] == ["published", "published"]
    assert all(sorted(r["participants"]) == device_ids for r in agg["rounds"])
    assert agg["model_versions"] == [1, 2, 3]
    with open_storage(f"sqlite://{agg['database']}") as storage:
        registry = ModelRegistry(storage)
        v1, v3 = registry.get(1).arrays, registry.get(3).arrays
        stored = {
            rid: {
                stage: storage.round_messages(rid, stage=stage)
                for stage in (Stage.ADVERTISE_KEYS, Stage.SHARE_KEYS, Stage.MASKED_INPUT,
                              Stage.CONSISTENCY_CHECK, Stage.UNMASK)
            }
            for rid in (r["round_id"] for r in agg["rounds"])
        }  # fmt: skip
    assert set(v1) == set(v3) and any(not np.array_equal(v1[k], v3[k]) for k in v1)
    assert all(n["l2"] > 0 for n in agg["update_norms"]) and len(agg["update_norms"]) == 2

    # What left each device: per round exactly one masked vector of (parameters + 1) 32-bit words plus a
    # small envelope, and only a few hundred bytes of keys, shares and unmasking shares.
    dim = agg["parameters"]
    assert agg["expected_masked_input_bytes"] == (dim + 1) * 4
    for agent in agents:
        assert len(agent["rounds"]) == 2
        for rid, sent in agent["uploaded_bytes"].items():
            masked = sent["stages"]["masked_input"]
            assert (dim + 1) * 4 <= masked <= (dim + 1) * 4 + 256
            assert sent["total"] - masked < 8192
            for stage, messages in stored[int(rid)].items():
                assert len(messages[agent["device_id"]]) == sent["stages"][stage.key]
        # The device's own count of its requests covers what the aggregator stored from it, and exceeds it
        # only by the requests' envelopes and polls.
        for job in agent["rounds"]:
            stored_total = agent["uploaded_bytes"][str(job["round_id"])]["total"]
            assert stored_total <= job["wire_payload_bytes"] <= stored_total + 4096, job
            assert job["wire_bytes"] > job["wire_payload_bytes"] and job["wire_calls"] > 5
        # DP-SGD on: epsilon was spent each round and stays within two rounds' targets.
        assert all(j["dp"] is True and 0 < j["epsilon"] <= 3.0 + 1e-6 for j in agent["rounds"])
        assert 0 < agent["epsilon_total"] <= 6.0 + 1e-6
        assert agent["rounds"][0]["base_version"] == "1" and agent["rounds"][1]["base_version"] == "2"

    # Every device cached its clips as encrypted sessions: readable with its key, nothing in clear on disk,
    # and none of its features anywhere in the aggregator's database.
    clip_names = sorted(c for a in agents for c in a["clips"])
    assert len(clip_names) == 6 and len(set(clip_names)) == 6
    for agent in agents:
        assert agent["sessions"] == 2 and agent["sessions_sealed"] and agent["frames"] >= 10
        assert agent["at_rest_scan_clean"] and agent["cache_bytes"] > 0
        assert len(agent["pseudo_labels"]) == 2 and len(agent["crowd_face_vote"]) == 2
        assert set(agent["accuracy"]) == {"central_v1", "central_v3", "personal_from_central_v3"}
        assert all(
            0.0 <= e["vs_pseudo"] <= 1.0 and len(e["predictions"]) == 2 for e in agent["accuracy"].values()
        )
        features = _cached_features(agent)
        assert len(features) == 2
        cache_scan = scan_paths([Path(agent["state_dir"]) / "cache"], known_vectors=features)
        assert cache_scan.clean, cache_scan.summary()
        server_scan = scan_paths([Path(agg["database"])], known_vectors=features)
        assert "known_vector" not in server_scan.kinds, server_scan.summary()

    # Progress lines and the summary were printed; no process the demo started is left.
    assert "round 2:" in out and "=== fedfer demo summary ===" in out
    pids = summary["child_pids"] + [p for a in agents for p in a["worker_pids"]]
    assert len(pids) == 4 + 3 * 3
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [p for p in pids if _alive(p)]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "kill-9"])
def test_interrupting_the_demo_stops_every_process_it_started(
    short_dir: Path, assets: Path, signum: int
) -> None:
    proc = _demo(short_dir / "demo", assets)
    assert proc.stdout is not None
    seen: list[str] = []
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        assert line, "".join(seen)[-3000:]
        seen.append(line)
        if "started 3 agent daemons" in line:
            break
    children = subprocess.run(
        ["ps", "-o", "pid=", "--ppid", str(proc.pid)], capture_output=True, text=True, check=False
    ).stdout.split()
    assert len(children) == 4  # the aggregator and three supervisors
    proc.send_signal(signum)
    rest, _ = proc.communicate(timeout=60)
    if signum == signal.SIGINT:
        assert proc.returncode == 130, rest
        assert "every process it started was stopped" in rest
    else:
        assert proc.returncode == -signal.SIGKILL  # no cleanup code ran: the children die with their parent
    deadline = time.monotonic() + 30
    while any(_alive(int(p)) for p in children) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [p for p in children if _alive(int(p))]
    leftovers = subprocess.run(
        ["pgrep", "-f", str(short_dir / "demo")], capture_output=True, text=True
    ).stdout
    assert leftovers.strip() == ""


def test_configuration_is_checked_and_clips_are_dealt_to_agents(tmp_path: Path, assets: Path) -> None:
    clips = [Path(f"c{i}.flv") for i in range(6)]
    shares = split_clips(clips, 3)
    assert [len(s) for s in shares] == [2, 2, 2] and sorted(c for s in shares for c in s) == clips
    assert split_clips(clips[:2], 3) == [clips[:2], [clips[1], clips[0]], clips[:2]]
    with pytest.raises(ValidationError):
        split_clips([], 3)
    with pytest.raises(ValidationError, match="agents"):
        DemoConfig(workdir=tmp_path, assets=assets, agents=2)
    with pytest.raises(ValidationError, match="rounds"):
        DemoConfig(workdir=tmp_path, assets=assets, rounds=True)
    with pytest.raises(ValidationError, match="assets"):
        DemoConfig(workdir=tmp_path, assets=tmp_path)
    with pytest.raises(ValidationError, match="too long"):
        DemoConfig(workdir=tmp_path / ("x" * 80), assets=assets)
    # A workdir that already holds a demo is refused, so a second run never mixes state with the first.
    used = Path(tempfile.mkdtemp(prefix="fedfer-demo-", dir="/tmp"))
    try:
        (used / "aggregator").mkdir()
        proc = _demo(used, assets)
        out, _ = proc.communicate(timeout=120)
    finally:
        shutil.rmtree(used, ignore_errors=True)
    assert proc.returncode == 1 and "already holds a demo" in out


def test_source_option_takes_a_camera_or_video_paths_and_names_itself_in_errors(
    tmp_path: Path, assets: Path
) -> None:
    from fedfer.agent.config import parse_config
    from fedfer.bench.demo import _Agent, _agent_config, _Aggregator, parse_source

    sample = sorted((assets / "data" / "crema-d-sample").glob("*.flv"))
    # Default: the real clips in the assets folder.
    assert parse_source("", assets).clips == tuple(sample) and parse_source("", assets).camera is None
    # PATH[,PATH...]: video files and folders of them (other files in a folder are ignored), in order, once.
    folder = tmp_path / "videos"
    folder.mkdir()
    for clip in sample[:2]:
        (folder / clip.name).symlink_to(clip)
    (folder / "notes.txt").write_text("not a video")
    got = parse_source(f"{sample[5]}, {folder},{sample[0]}", assets)
    assert got.camera is None and got.clips == (
        sample[5],
        folder / sample[0].name,
        folder / sample[1].name,
        sample[0],
    )
    assert [len(s) for s in split_clips(list(got.clips), 3)] == [2, 1, 1]
    assert (
        parse_source("camera:2", assets) == parse_source(" camera:2 ", assets)
        and parse_source("camera:2", assets).camera == 2
    )
    for bad, message in (
        ("camera:x", "camera index"),
        (str(tmp_path / "gone.mp4"), "does not exist"),
        (str(folder / "notes.txt"), "not a video file"),
        (str(tmp_path), "holds no video files"),
        (f"{sample[0]},", "does not exist"),
    ):
        with pytest.raises(ValidationError, match=message):
            parse_source(bad, assets)
    # Without the sample clips and without --source, the error says what to pass.
    bare = tmp_path / "assets"
    (bare / "models").mkdir(parents=True)
    with pytest.raises(ValidationError, match=r"--source camera:N or --source PATH"):
        DemoConfig(workdir=tmp_path / "w", assets=bare)
    config = DemoConfig(workdir=tmp_path / "w", assets=bare, source=str(folder))
    assert parse_source(config.source, config.assets).clips == (
        folder / sample[0].name,
        folder / sample[1].name,
    )

    # The agents' configurations: linked clips read once as fast as vision goes, or the camera (live).
    agent = _Agent(
        name="agent1",
        root=tmp_path / "a1",
        clips=[],
        config=tmp_path / "a1.toml",
        state=tmp_path / "s",
        log=tmp_path / "l",
    )
    agg = _Aggregator(directory=tmp_path / "agg", proc=None, port=1234, enroll_port=1235, log=tmp_path / "g")  # type: ignore[arg-type]
    files = parse_config(_agent_config(config, agent, agg, tmp_path / "ifer.json"))
    assert files.capture.source == str(agent.root / "camera") and not files.capture.loop
    assert not files.capture.realtime and files.federation.server == "127.0.0.1:1234"
    camera = parse_config(_agent_config(config, agent, agg, tmp_path / "ifer.json", camera=2))
    assert camera.capture.source == "camera:2" and camera.capture.realtime and not camera.capture.loop
