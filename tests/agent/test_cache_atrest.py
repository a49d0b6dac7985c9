"""The at-rest scanner finds planted frames, crops, images and features, and finds nothing in the cache."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import cv2
import numpy as np
import pytest

from fedfer.agent.store.cache import FeatureCache
from fedfer.bench.atrest import AtRestScanner, scan_paths
from fedfer.security.errors import ValidationError
from tests.agent.test_cache import make_records

CLIP = "data/crema-d-sample/1001_DFA_HAP_XX.flv"


def first_frame(assets: Path) -> np.ndarray:
    """A real decoded CREMA-D frame (480x360 BGR), as the capture worker would hold it in RAM."""
    cap = cv2.VideoCapture(str(assets / CLIP))
    try:
        for _ in range(10):
            ok, frame = cap.read()
        assert ok
    finally:
        cap.release()
    return np.ascontiguousarray(frame)


def fer_pngs(assets: Path, n: int) -> list[Path]:
    return sorted((assets / "data/fer2013/test/happy").glob("*.png"))[:n]


def read_gray(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    assert image is not None, path
    return np.asarray(image)


def noise(n: int) -> bytes:
    return os.urandom(n)


def test_planted_frames_crops_images_and_features_are_found(assets: Path, tmp_path: Path) -> None:
    frame = first_frame(assets)
    crop = cv2.resize(frame[40:320, 120:400], (224, 224))
    face48 = read_gray(fer_pngs(assets, 1)[0])
    feature = make_records(1, seed=3)[0].feature
    planted = tmp_path / "planted"
    planted.mkdir()
    (planted / "frame.raw").write_bytes(frame.tobytes())
    (planted / "crop-in-noise.bin").write_bytes(noise(3001) + crop.tobytes() + noise(777))
    (planted / "face48.bin").write_bytes(noise(999) + face48.tobytes() + noise(1234))
    (planted / "shot.dat").write_bytes(noise(500) + cv2.imencode(".jpg", frame)[1].tobytes() + noise(500))
    (planted / "feature16.bin").write_bytes(noise(4097) + feature.tobytes() + noise(300))
    (planted / "feature32.bin").write_bytes(noise(1001) + feature.astype(np.float32).tobytes() + noise(99))
    # A PNG hidden inside a SQLite database, as a careless cache would store it.
    db = sqlite3.connect(planted / "leaky.sqlite")
    db.execute("CREATE TABLE t (b BLOB)")
    db.execute("INSERT INTO t VALUES (?)", (fer_pngs(assets, 2)[1].read_bytes(),))
    db.commit()
    db.close()

    report = AtRestScanner(known_vectors=[feature]).scan([planted])
    by_file: dict[str, set[str]] = {}
    for f in report.findings:
        by_file.setdefault(f.path.name, set()).add(f.kind)
    assert {"frame_sized_file", "raw_pixels"} <= by_file["frame.raw"]
    assert "raw_pixels" in by_file["crop-in-noise.bin"]
    assert "raw_pixels" in by_file["face48.bin"]
    assert "jpeg" in by_file["shot.dat"]
    assert {"known_vector", "float16_run"} <= by_file["feature16.bin"]
    assert {"known_vector", "float32_run"} <= by_file["feature32.bin"]
    assert "png" in by_file["leaky.sqlite"]
    assert report.files_scanned == 7 and not report.clean
    # Offsets point at the planted region.
    crop_hits = [f for f in report.findings if f.path.name == "crop-in-noise.bin" and f.kind == "raw_pixels"]
    assert any(abs(f.offset - 3001) < 512 and f.length > 100_000 for f in crop_hits)


def test_most_real_faces_are_found_as_raw_pixels(assets: Path) -> None:
    scanner = AtRestScanner()
    faces = [read_gray(p) for p in fer_pngs(assets, 60)]
    found = sum(
        any(kind == "raw_pixels" for _, kind, _ in scanner.scan_bytes(noise(613) + f.tobytes() + noise(911)))
        for f in faces
    )
    assert found >= 0.95 * len(faces), found


def test_random_bytes_and_source_text_are_clean() -> None:
    scanner = AtRestScanner()
    assert scanner.scan_bytes(noise(1 << 20)) == []
    repo = Path(__file__).resolve().parents[2]
    mine = ["agent/store/cache.py", "agent/store/keys.py", "bench/atrest.py", "security/envelope.py"]
    source = b"\n".join((repo / name).read_bytes() for name in mine)
    assert len(source) > 50_000
    assert scanner.scan_bytes(source) == []


def test_cache_directory_holds_nothing_readable(tmp_path: Path) -> None:
    state = tmp_path / "state"
    written = []
    with FeatureCache(state / "cache") as cache:
        for s in range(4):
            sid = cache.begin_session()
            records = make_records(75, seed=10 + s)
            written += records
            for start in range(0, 75, 25):
                cache.append_batch(sid, records[start : start + 25])
            if s % 2:
                cache.end_session(sid)
        cache.forget(cache.sessions()[0].session_id)
        sid = cache.begin_session()
        for r in make_records(10, seed=99):  # single appends leave data in the WAL, scanned too
            cache.append(sid, r)
        files = sorted(p.name for p in (state / "cache").iterdir())
        report = scan_paths([state], known_vectors=[r.feature for r in written[::7]])
        assert report.clean, report.summary()
    assert "features.sqlite-wal" in files and report.files_scanned == len(files)
    assert report.bytes_scanned > 250 * 2600


def test_scanner_configuration_is_checked() -> None:
    with pytest.raises(ValidationError):
        AtRestScanner(min_pixel_bytes=10)
    with pytest.raises(ValidationError):
        AtRestScanner(known_vectors=[np.zeros(4, np.float16)])
    with pytest.raises(ValidationError):
        AtRestScanner(frame_shapes=[(224, 224)])  # type: ignore[list-item]
