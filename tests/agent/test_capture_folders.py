"""Folder sources: unreadable files are skipped and listed; still images are frames, runs of them sessions.

Real OpenCV on real files (CREMA-D clips, Taiwanese photos linked from ../shared, files of random bytes); the
daemon runs the same sources in tests/agent/test_daemon_folders.py.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import cv2
import numpy as np
import pytest

from fedfer.agent.capture.images import MAX_RUN_IMAGES, image_runs, read_image, session_key
from fedfer.agent.capture.ledger import FailedFiles, ProcessedFiles, file_key, run_key
from fedfer.agent.capture.sources import FAILED_FILE, FileFailed, SegmentEnd, SourceSequence, open_source
from fedfer.agent.capture.video import Frame, SourceUnavailableError, UnreadableFileError
from fedfer.agent.config import ConfigError, apply_path_overrides, parse_config
from fedfer.agent.daemon.wire import decode_file_end, decode_segment_end, encode_file_end, encode_segment_end
from fedfer.agent.store.sink import FileEnd
from tests.agent.folder_sources import CLIP, NOT_A_VIDEO, camera_folder, link_photos

PHOTOS = ("0101a02", "0101a05", "0101a06", "0111b01", "0111b02", "0111b03", "0111c03")


def _split(
    items: list[Frame | SegmentEnd | FileFailed],
) -> tuple[list[Frame], list[SegmentEnd], list[FileFailed]]:
    return (
        [i for i in items if isinstance(i, Frame)],
        [i for i in items if isinstance(i, SegmentEnd)],
        [i for i in items if isinstance(i, FileFailed)],
    )


def test_an_unreadable_file_is_skipped_listed_and_tried_again_only_once_changed(
    tmp_path: Path, assets: Path
) -> None:
    folder = camera_folder(tmp_path, assets)
    bad = folder / NOT_A_VIDEO
    (folder / "0001_empty.avi").write_bytes(b"")
    (folder / "0002_not_a_photo.jpg").write_bytes(os.urandom(5000))
    (tmp_path / "state").mkdir()
    failed = FailedFiles(tmp_path / "state" / FAILED_FILE)
    ledger = ProcessedFiles(tmp_path / "state" / "processed.json")

    def read() -> tuple[list[Frame], list[SegmentEnd], list[FileFailed]]:
        source = SourceSequence(
            source=str(folder), fps=5, max_width=320, loop=False, ledger=ledger, failed=failed
        )
        return _split(list(source))

    frames, ends, skipped = read()
    # The bad files are skipped with their reasons, and the real clip after them is read whole.
    assert [(f.name, f.reason, f.known) for f in skipped] == [
        ("0000_not_a_video.mp4", "cannot be opened as a video", False),
        ("0001_empty.avi", "cannot be opened as a video", False),
        ("0002_not_a_photo.jpg", "is not a decodable image", False),
    ]
    assert len(ends) == 1 and ends[0].file == file_key(folder / CLIP) and ends[0].frames == len(frames) >= 8
    listed = json.loads(failed.path.read_text())["failed"]
    assert listed == {file_key(folder / f.name): f.reason for f in skipped}
    assert "0000_not_a_video" not in failed.path.read_text()  # the list names no file (keys only)
    assert (failed.path.stat().st_mode & 0o777) == 0o600

    # Read again (a restarted capture with the same list): the failed files are not tried again.
    again = FailedFiles(failed.path)
    assert again.reason(file_key(bad)) == "cannot be opened as a video"
    frames2, _, skipped2 = read()
    assert [f.known for f in skipped2] == [True, True, True] and len(frames2) == len(frames)

    # A file that changes has another key: it is read again, and now it is a real clip.
    bad.write_bytes((folder / CLIP).read_bytes())
    frames3, ends3, skipped3 = read()
    assert [f.name for f in skipped3] == ["0001_empty.avi", "0002_not_a_photo.jpg"]
    assert ends3[0].file == file_key(bad) and ends3[0].frames == ends[0].frames
    assert {f.file for f in frames3} == {file_key(bad), file_key(folder / CLIP)}


def test_a_looping_source_with_nothing_readable_fails_instead_of_spinning(tmp_path: Path) -> None:
    folder = tmp_path / "camera"
    folder.mkdir()
    (folder / "a.mp4").write_bytes(os.urandom(1000))
    (folder / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(100))
    source = SourceSequence(source=str(folder), fps=5, max_width=320, loop=True)
    got: list[object] = []
    with pytest.raises(SourceUnavailableError, match="no readable video or image file"):
        got.extend(source)
    assert [type(i) for i in got] == [FileFailed, FileFailed]
    # Without a failed-files list the source itself remembers: the next pass skips them untried.
    with pytest.raises(SourceUnavailableError):
        got.extend(source)
    assert [i.known for i in got if isinstance(i, FileFailed)] == [False, False, True, True]


def test_images_are_frames_at_the_sample_rate_and_runs_of_a_name_prefix_are_segments(
    tmp_path: Path, assets: Path
) -> None:
    folder = link_photos(assets, tmp_path / "photos", PHOTOS)
    (folder / "0111b02x.jpg").write_bytes(os.urandom(3000))  # a corrupt photo inside the 0111b run
    state = tmp_path / "state"
    text = f'[capture]\nsource = "{folder}"\nfps = 4\nloop = false\nmax_width = 128\n'
    text += 'image_session_key = "^.{5}"\n'
    config = apply_path_overrides(parse_config(text), {"FEDFER_STATE_DIR": str(state)})
    frames, ends, skipped = _split(list(open_source(config)))

    assert [(f.name, f.reason) for f in skipped] == [("0111b02x.jpg", "is not a decodable image")]
    # One segment per 5-character prefix, in name order: 0101a (3 photos), 0111b (3), 0111c (1).
    assert [e.frames for e in ends] == [3, 3, 1]
    groups = [["0101a02", "0101a05", "0101a06"], ["0111b01", "0111b02", "0111b03"], ["0111c03"]]
    for end, names in zip(ends, groups, strict=True):
        mine = [f for f in frames if f.segment == end.segment]
        assert [f.index for f in mine] == [0, 1, 2][: len(names)]
        assert [f.timestamp for f in mine] == [i / 4 for i in range(len(names))]  # one photo each 1/fps s
        assert end.members == tuple(file_key(folder / f"{n}.jpg") for n in names)
        assert end.file == run_key(folder, names[0][:5]) and {f.file for f in mine} == {end.file}
    assert len({e.segment for e in ends}) == 3
    # Due times run on across segments, so real-time pacing never bursts.
    due = [f.due_s for f in frames]
    assert due == sorted(due) and len(set(due)) == len(due)
    # Each frame is the photo as OpenCV decodes it, in RGB order, scaled down to max_width.
    bgr = cv2.resize(cv2.imread(str(folder / "0101a02.jpg")), (128, 128), interpolation=cv2.INTER_AREA)
    assert np.array_equal(frames[0].image, bgr[:, :, ::-1])

    # The learner marks a run's photos done (not the run): they are skipped, a photo added later is read.
    ledger = ProcessedFiles(state / "capture-processed.json")
    ledger.mark_done(ends[0].file, ends[0].members)
    assert not ledger.is_done(ends[0].file) and all(ledger.is_done(k) for k in ends[0].members)
    (folder / "0101a09.jpg").symlink_to(folder / "0101a02.jpg")  # another name for a photo already stored
    (folder / "0101a10.jpg").write_bytes((folder / "0101a05.jpg").read_bytes())  # a new photo of the run
    frames, ends, _ = _split(list(open_source(config)))
    assert [e.frames for e in ends] == [1, 3, 1]
    assert ends[0].members == (file_key(folder / "0101a10.jpg"),) and ends[0].file == run_key(folder, "0101a")


def test_session_keys_group_consecutive_names() -> None:
    names = ["0101a02.jpg", "0101a05.jpg", "0111b01.jpg", "x.jpg", "y.jpg", "0111b03.jpg"]
    paths = [Path(n) for n in names]
    prefix = re.compile(r"^.{5}")
    assert [(k, [p.name for p in run]) for k, run in image_runs(paths, prefix)] == [
        ("0101a", ["0101a02.jpg", "0101a05.jpg"]),
        ("0111b", ["0111b01.jpg"]),
        ("x.jpg", ["x.jpg"]),
        ("y.jpg", ["y.jpg"]),
        ("0111b", ["0111b03.jpg"]),  # the same key again, not consecutive: another run
    ]
    group = re.compile(r"^(\d{2})\d")  # one run per performer (the first group is the key)
    assert session_key("0111b01.jpg", group) == "01" and session_key("x.jpg", group) == ""
    assert [k for k, _ in image_runs(paths, group)] == ["01", "", "01"]
    assert [len(r) for _, r in image_runs(paths, None)] == [6]  # no key: the folder's images are one run
    many = [Path(f"img{i:05d}.png") for i in range(MAX_RUN_IMAGES + 5)]
    assert [len(r) for _, r in image_runs(many, None)] == [MAX_RUN_IMAGES, 5]


def test_image_session_key_is_validated_and_documented() -> None:
    assert parse_config('[capture]\nimage_session_key = "^(..)_"\n').capture.image_session_key == "^(..)_"
    assert parse_config("").capture.image_session_key == ""
    for bad, message in (
        ('"^(."', "capture.image_session_key is not a valid regular expression"),
        ('"(a)(b)"', "capture.image_session_key must be a regular expression .* at most one group"),
        ("5", "capture.image_session_key must be a regular expression"),
        (f'"{"a" * 300}"', "capture.image_session_key must be a regular expression"),
    ):
        with pytest.raises(ConfigError, match=message):
            parse_config(f"[capture]\nimage_session_key = {bad}\n")


def test_unreadable_images_and_vanished_ones_are_told_apart(tmp_path: Path) -> None:
    (tmp_path / "zero.png").write_bytes(b"")
    with pytest.raises(UnreadableFileError, match=r"zero\.png is not a decodable image") as info:
        read_image(tmp_path / "zero.png", max_width=None)
    assert info.value.reason == "is not a decodable image" and str(tmp_path) not in str(info.value)
    with pytest.raises(SourceUnavailableError, match="does not exist") as gone:
        read_image(tmp_path / "gone.jpg", max_width=None)
    assert not isinstance(gone.value, UnreadableFileError)  # a vanished file is retried, not listed


def test_segment_and_file_ends_carry_a_runs_members_on_the_wire() -> None:
    members = tuple(os.urandom(32).hex() for _ in range(3))
    end = SegmentEnd("seg", "ab" * 32, 5, 3, members)
    assert decode_segment_end(encode_segment_end(end)) == end
    video = SegmentEnd("seg", "cd" * 32, 6, 40)
    assert decode_segment_end(encode_segment_end(video)) == video and video.members == ()
    account = FileEnd("ab" * 32, 5, complete=True, records=2, members=members)
    assert decode_file_end(encode_file_end(account)) == account
    header = encode_file_end(account)[0]
    assert decode_file_end([header, b"\x00" * 31]) is None  # not whole keys
    assert decode_file_end([header, b"\x00" * 32 * (MAX_RUN_IMAGES + 1)]) is None  # more than a run holds
    assert decode_segment_end(encode_segment_end(end)[:1]) is None
