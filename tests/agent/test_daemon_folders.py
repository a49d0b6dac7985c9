"""The real daemon on folder sources: a file that is not a video, and a folder of a real performer's photos.

``fedfer-agent run`` with real workers (OpenCV, MediaPipe, MobileNetV2, the encrypted cache) and the real
``fedfer-agent status`` / ``sessions`` command lines.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from fedfer.agent.capture.images import read_image
from fedfer.agent.capture.ledger import file_key
from fedfer.agent.capture.sources import FAILED_FILE, PROCESSED_FILE
from fedfer.agent.config import apply_path_overrides, parse_config
from fedfer.agent.store.device import open_cache
from tests.agent.daemon_harness import FAST_DAEMON, Agent
from tests.agent.folder_sources import CLIP, NOT_A_VIDEO, camera_folder, config_detector, link_photos

pytestmark = pytest.mark.slow

OTHER_CLIP = "1001_DFA_SAD_XX.flv"


def _config(tmp_path: Path, source: Path, extra: str = "") -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(
        f'[capture]\nsource = "{source}"\nfps = 5\nrealtime = false\nloop = false\n{extra}\n'
        f"[learning]\nallow_untrained_ifer = true\n{FAST_DAEMON}",
        encoding="utf-8",
    )
    return path


def _finished(status: dict) -> bool:  # type: ignore[type-arg]
    workers = status["workers"]
    capture, vision, learner = (workers[r]["stats"] for r in ("capture", "vision", "learner"))
    return (
        capture.get("source_done") is True
        and vision.get("frames_in", 0) == capture.get("frames_sent", -1)
        and learner.get("records_in", 0) == vision.get("records_sent", -1)
        and learner.get("files_done", 0) + learner.get("files_incomplete", 0)
        == capture.get("files_ended", -1)
    )


def test_a_file_that_is_not_a_video_is_skipped_named_by_plain_status_and_capture_goes_on(
    tmp_path: Path, assets: Path
) -> None:
    """Issue 12 finding 4: before, the bad file stopped capture for good; plain `status` said "capturing"."""
    folder = camera_folder(tmp_path, assets)
    bad = folder / NOT_A_VIDEO
    agent = Agent(tmp_path, _config(tmp_path, folder))
    try:
        agent.start()
        status = agent.wait_for(_finished, timeout=120)
        capture = status["workers"]["capture"]["stats"]
        # The real clip after the bad file was read whole and cached; the bad one is skipped, with its reason.
        assert capture["frames_sent"] >= 8 and capture["files_ended"] == 1 and capture["files_failed"] == 1
        assert capture["failed_files"] == [{"file": bad.name, "reason": "cannot be opened as a video"}]
        assert capture.get("source_failures", 0) == 0 and "source_error" not in capture
        assert status["workers"]["learner"]["stats"]["files_done"] == 1
        sessions = agent.client.request("sessions")["sessions"]
        assert sessions and sum(s["verified"] for s in sessions) >= 5
        text = agent.cli("status")
        assert "capture finished (every file read)" in text and "capturing" not in text
        assert "files skipped, cannot be read (1):" in text
        assert "0000_not_a_video.mp4: cannot be opened as a video" in text
        log = agent.log_text()
        assert log.count("a file of the capture source cannot be read; skipped") == 1
        # The failed-files list names no file; the processed-files ledger has the clip.
        assert json.loads((agent.state_dir / FAILED_FILE).read_text()) == {
            "failed": {file_key(bad): "cannot be opened as a video"}
        }
        assert json.loads((agent.state_dir / PROCESSED_FILE).read_text())["done"] == [file_key(folder / CLIP)]
        assert agent.stop() == 0

        # A restart does not try the bad file again (nor read the stored clip again), and still names it.
        agent.start()
        status = agent.wait_for(lambda s: s["workers"]["capture"]["stats"].get("source_done") is True)
        capture = status["workers"]["capture"]["stats"]
        assert capture["frames_read"] == 0 and capture["failed_files"][0]["file"] == bad.name
        assert "0000_not_a_video.mp4: cannot be opened as a video" in agent.cli("status")
        assert "(as before: unchanged since it failed)" in agent.log_text()
        assert agent.stop() == 0

        # Once the file changes (here: it becomes a real clip) it is read again.
        bad.write_bytes((assets / "data" / "crema-d-sample" / OTHER_CLIP).read_bytes())
        agent.start()
        status = agent.wait_for(_finished, timeout=120)
        capture = status["workers"]["capture"]["stats"]
        assert capture["frames_read"] >= 8 and capture["files_failed"] == 0 and capture["failed_files"] == []
        assert status["workers"]["learner"]["stats"]["files_done"] == 1
        assert "files skipped" not in agent.cli("status")
        assert agent.stop() == 0
    finally:
        agent.kill()


PERFORMER_01 = {
    "0101a": ("0101a02", "0101a05", "0101a06"),
    "0111b": ("0111b01", "0111b02", "0111b03", "0111b05"),
    "0111c": ("0111c03", "0111c06"),
}


def test_a_folder_of_a_performers_photos_is_one_session_per_name_prefix(tmp_path: Path, assets: Path) -> None:
    """Issue 14's capture part: real photos take a webcam's path (faces, crop, f, g, encrypted cache)."""
    folder = link_photos(
        assets, tmp_path / "performer-01", tuple(n for names in PERFORMER_01.values() for n in names)
    )
    (folder / "0111b04.jpg").write_bytes(b"\xff\xd8\xff\xe0" + os.urandom(2000))  # a corrupt photo in a run
    config_path = _config(
        tmp_path, folder, 'image_session_key = "^.{5}"  # performer, type, view, expression'
    )
    agent = Agent(tmp_path, config_path)
    config = apply_path_overrides(
        parse_config(config_path.read_text()),
        {"FEDFER_STATE_DIR": str(agent.state_dir), "FEDFER_ASSETS": str(assets)},
    )
    try:
        agent.start()
        status = agent.wait_for(_finished, timeout=180)
        capture = status["workers"]["capture"]["stats"]
        assert capture["frames_sent"] == 9 and capture["files_ended"] == 3 and capture["frames_dropped"] == 0
        assert capture["failed_files"] == [{"file": "0111b04.jpg", "reason": "is not a decodable image"}]
        assert status["workers"]["vision"]["stats"]["faces"] == 9  # a frontal face in every photo
        assert status["workers"]["learner"]["stats"]["files_done"] == 3
        listed = agent.client.request("sessions")["sessions"]
        assert [s["frames"] for s in listed] == [3, 4, 2] and all(s["sealed"] for s in listed)
        text = agent.cli("sessions")
        assert text.startswith("3 cached session(s)\n") and "DAMAGED" not in text
        assert "0111b04.jpg: is not a decodable image" in agent.cli("status")
        assert agent.stop() == 0

        # What was cached is what the detector finds in each photo, one session per group, photos 1/fps apart.
        detector = config_detector(config)
        cache = open_cache(config)
        try:
            for info, names in zip(cache.sessions(), PERFORMER_01.values(), strict=True):
                records = cache.read_session(info.session_id)
                assert [r.timestamp for r in records] == [i / 5 for i in range(len(names))]
                for record, name in zip(records, names, strict=True):
                    face = detector.detect(read_image(folder / f"{name}.jpg", max_width=640))
                    assert face is not None
                    assert (
                        np.allclose(record.box, face.box, atol=1e-3) and abs(record.score - face.score) < 1e-4
                    )
                    assert np.isfinite(record.feature.astype(np.float32)).all()
                    assert record.feature.any()
        finally:
            cache.close()
            detector.close()
        # Every readable photo is marked done; a restart reads nothing again.
        done = set(json.loads((agent.state_dir / PROCESSED_FILE).read_text())["done"])
        assert done == {file_key(folder / f"{n}.jpg") for names in PERFORMER_01.values() for n in names}
        agent.start()
        status = agent.wait_for(lambda s: s["workers"]["capture"]["stats"].get("source_done") is True)
        assert status["workers"]["capture"]["stats"]["frames_read"] == 0
        assert len(agent.client.request("sessions")["sessions"]) == 3
        assert agent.stop() == 0
    finally:
        agent.kill()
