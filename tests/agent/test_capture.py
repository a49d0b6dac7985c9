"""OpenCV capture on the real CREMA-D clips: sampling; clear errors for missing/broken/vanished sources."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest

from fedfer.agent.capture.video import (
    CaptureError,
    Frame,
    SourceUnavailableError,
    TruncatedSourceError,
    VideoSource,
)
from fedfer.security.errors import FedferError, ValidationError
from tests.agent import vision_support as vs


def _hap(assets: Path) -> Path:
    return next(p for p in vs.clips(assets) if "_HAP_" in p.name)


def test_every_frame_of_a_real_clip(assets: Path) -> None:
    with VideoSource(source=_hap(assets)) as src:
        frames = list(src.frames())
        assert src.native_fps == pytest.approx(29.97, abs=0.01)
        assert src.announced_frames == 56
    assert len(frames) == 56
    assert [f.index for f in frames] == list(range(56))
    assert frames[0].image.shape == (360, 480, 3) and frames[0].image.dtype == np.uint8
    assert frames[-1].timestamp == pytest.approx(55 / 29.97, abs=1e-3)
    assert "image" not in repr(frames[0]) and "Frame(index=0" in repr(frames[0])


def test_sampling_rate_and_limits(assets: Path) -> None:
    with VideoSource(source=_hap(assets), sample_fps=10) as src:
        frames = list(src.frames())
    times = np.array([f.timestamp for f in frames])
    assert 18 <= len(frames) <= 20  # 1.87 s at 10 fps
    assert np.all(np.diff(times) >= 0.1 - 1e-6) and np.all(np.diff(times) < 0.2)
    with VideoSource(source=_hap(assets), sample_fps=10, max_frames=5, max_width=240) as src:
        few = list(src.frames())
    assert len(few) == 5 and few[0].image.shape == (180, 240, 3)


def test_rgb_order(assets: Path) -> None:
    import cv2

    cap = cv2.VideoCapture(str(_hap(assets)))
    ok, bgr = cap.read()
    cap.release()
    assert ok
    with VideoSource(source=_hap(assets), max_frames=1) as src:
        (frame,) = list(src.frames())
    assert np.array_equal(frame.image, bgr[:, :, ::-1])


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(SourceUnavailableError, match="does not exist"):
        VideoSource(source=tmp_path / "absent.flv").open()
    garbage = tmp_path / "garbage.flv"
    garbage.write_bytes(b"this is not a video at all" * 10)
    with pytest.raises(SourceUnavailableError, match="cannot be opened"):
        list(VideoSource(source=garbage).frames())
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(CaptureError):
        list(VideoSource(source=empty).frames())


def test_truncated_file_yields_what_it_has_then_errors(assets: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut.flv"
    cut.write_bytes(_hap(assets).read_bytes()[:60_000])
    got: list[Frame] = []
    with pytest.raises(TruncatedSourceError, match="truncated") as info, VideoSource(source=cut) as src:
        got.extend(src.frames())
    assert isinstance(info.value, FedferError)
    assert 0 < len(got) < 56  # frames before the cut were delivered, nothing crashed
    assert str(tmp_path) not in str(info.value)  # file name only, never the full path


def test_absent_camera_and_unreachable_stream() -> None:
    with pytest.raises(SourceUnavailableError, match="camera 63"):
        VideoSource(source=63).open()
    with socket.socket() as s:  # a loopback port with nobody listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://user:secret@127.0.0.1:{port}/live.flv"
    with pytest.raises(SourceUnavailableError) as info:
        VideoSource(source=url).open()
    assert "secret" not in str(info.value) and "stream http" in str(info.value)


def test_vanished_live_source_is_an_error_not_a_crash(assets: Path, tmp_path: Path) -> None:
    # A stream that stops mid-way: an HTTP server that serves part of a clip and then closes the connection.
    import http.server
    import threading

    blob = _hap(assets).read_bytes()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "video/x-flv")
            self.end_headers()
            self.wfile.write(blob[:80_000])  # then the "camera" vanishes

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        frames: list[Frame] = []
        url = f"http://127.0.0.1:{server.server_address[1]}/cam.flv"
        with (
            pytest.raises(SourceUnavailableError, match="stopped delivering"),
            VideoSource(source=url) as src,
        ):
            frames.extend(src.frames())
        assert len(frames) > 0
    finally:
        server.shutdown()
        server.server_close()


def test_configuration_checked() -> None:
    for bad in (
        {"source": -1},
        {"source": True},
        {"source": 1.5},
        {"source": "x.flv", "sample_fps": 0},
        {"source": "x.flv", "max_frames": 0},
        {"source": "x.flv", "max_width": 3},
    ):
        with pytest.raises(ValidationError):
            VideoSource(**bad)


def test_close_stops_iteration(assets: Path) -> None:
    src = VideoSource(source=_hap(assets))
    it = src.frames()
    next(it)
    src.close()
    assert list(it) == []
