"""Dataset readers against the real FER2013 folders and the official CREMA-D tables."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedfer.agent.errors import DatasetError
from fedfer.agent.records import CLASS_SETS
from fedfer.agent.training.data import (
    crema_label,
    crema_vote_labels,
    list_image_folder,
    read_crema_demographics,
    read_crema_summary,
    read_gray,
    scan_crema_clips,
    subject_split,
)


def test_fer2013_test_listing_maps_folders_to_the_class_sets(assets: Path) -> None:
    root = assets / "data" / "fer2013" / "test"
    seven = list_image_folder(root, 7)
    six = list_image_folder(root, 6)
    four = list_image_folder(root, 4)
    assert len(seven) == 7178
    assert len(six) == 7178 - 831  # no surprise
    assert len(four) == 958 + 1774 + 1247 + 1233
    happy = CLASS_SETS[6].index("happiness")
    assert sum(1 for it in six if it.label == happy) == 1774
    assert all(it.path.parent.name == "happy" for it in six if it.label == happy)
    img = read_gray(seven[0].path)
    assert img.shape == (48, 48) and img.dtype.name == "uint8"


def test_image_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError):
        list_image_folder(tmp_path / "missing", 6)
    (tmp_path / "happy").mkdir()
    (tmp_path / "happy" / "a.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match="no images for classes"):
        list_image_folder(tmp_path, 4)
    with pytest.raises(DatasetError):
        read_gray(tmp_path / "happy" / "a.png")
    with pytest.raises(DatasetError):
        list_image_folder(tmp_path, 5)


def test_crema_summary_votes_and_plurality_labels(assets: Path) -> None:
    table = read_crema_summary(assets / "data" / "crema-d-sample" / "summaryTable.csv")
    assert len(table) == 7442
    clip = table["1001_DFA_FEA_XX"]
    assert (clip.actor, clip.sentence, clip.acted, clip.level) == (1001, "DFA", "fear", "XX")
    # The crowd saw disgust in the face, heard fear in the voice.
    assert clip.votes == {"face": "D", "voice": "F", "audiovisual": "F"}
    six = CLASS_SETS[6]
    face = crema_vote_labels(table.values(), modality="face", num_classes=6)
    av = crema_vote_labels(table.values(), modality="audiovisual", num_classes=6)
    assert six[face["1001_DFA_FEA_XX"]] == "disgust"
    assert six[av["1001_DFA_FEA_XX"]] == "fear"
    # Ties have no plurality and are left out; 4-class drops fear/disgust.
    assert crema_label("A:D", 6) is None
    assert crema_label("D", 4) is None
    assert crema_label("H", 4) == CLASS_SETS[4].index("happiness")
    n_ties = sum(1 for c in table.values() if ":" in c.votes["face"])
    assert len(face) == 7442 - n_ties
    with pytest.raises(DatasetError):
        crema_vote_labels(table.values(), modality="smell")
    with pytest.raises(DatasetError):
        crema_label("Q", 6)


def test_subject_split_is_disjoint_gender_balanced_and_stable(assets: Path) -> None:
    sexes = read_crema_demographics(assets / "data" / "crema-d-sample" / "VideoDemographics.csv")
    assert len(sexes) == 91
    split = subject_split(sexes)
    parts = [set(split.train), set(split.dev), set(split.test)]
    assert sum(len(p) for p in parts) == 91
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert len(split.test) == 31  # the paper's number of test actors
    for part in parts:
        women = sum(1 for a in part if sexes[a] == "Female")
        assert abs(women / len(part) - 43 / 91) < 0.08
    assert subject_split(sexes) == split
    assert subject_split(sexes, seed="other") != split
    assert split.of(split.test[0]) == "test"
    with pytest.raises(DatasetError):
        subject_split(sexes, fractions=(0.5, 0.5, 0.5))


def test_scan_crema_sample_joins_the_six_real_clips(assets: Path) -> None:
    clips = scan_crema_clips(assets / "data" / "crema-d-sample")
    assert sorted(clips) == [f"1001_DFA_{e}_XX" for e in ("ANG", "DIS", "FEA", "HAP", "NEU", "SAD")]
    assert all(c.path is not None and c.path.is_file() for c in clips.values())
    assert {c.acted for c in clips.values()} == set(CLASS_SETS[6])


def test_crema_responses_reader_counts_votes_per_modality(tmp_path: Path) -> None:
    # The documented finishedResponses.csv columns (the full corpus file is not on this machine).
    from fedfer.agent.training.data import read_crema_responses

    rows = [
        ("1", "1001_DFA_ANG_XX", "2", "A"),
        ("2", "1001_DFA_ANG_XX", "2", "A"),
        ("3", "1001_DFA_ANG_XX", "2", "D"),
        ("4", "1001_DFA_ANG_XX", "1", "N"),
        ("5", "1001_DFA_HAP_XX", "2", "H"),
    ]
    f = tmp_path / "finishedResponses.csv"
    f.write_text(
        '"localid","clipName","queryType","respEmo"\n'
        + "".join(f'"{a}","{b}","{c}","{d}"\n' for a, b, c, d in rows)
    )
    six = CLASS_SETS[6]
    face = read_crema_responses(f, modality="face", num_classes=6)
    assert face["1001_DFA_ANG_XX"][six.index("anger")] == 2
    assert face["1001_DFA_ANG_XX"][six.index("disgust")] == 1
    assert face["1001_DFA_ANG_XX"].sum() == 3
    voice = read_crema_responses(f, modality="voice", num_classes=4)
    assert voice["1001_DFA_ANG_XX"][CLASS_SETS[4].index("neutral")] == 1 and "1001_DFA_HAP_XX" not in voice
    f.write_text('"clipName","queryType","respEmo"\n"x","2","Q"\n')
    with pytest.raises(DatasetError):
        read_crema_responses(f)
