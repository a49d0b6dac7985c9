"""Simulated subjects (labelled as a simulation): a consistent per-subject shift over jittered real faces."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedfer.agent.errors import DatasetError
from fedfer.agent.training.data import list_image_folder, read_gray
from fedfer.agent.training.simulate import make_styles, render_clips


def test_subject_clips_are_jittered_views_with_a_consistent_shift(assets: Path) -> None:
    items = list_image_folder(assets / "data" / "fer2013" / "test", 6)[:6]
    grays = [read_gray(it.path) for it in items]
    styles = make_styles(5, seed=3)
    assert make_styles(5, seed=3) == styles and len({s.name for s in styles}) == 5
    warm = max(styles, key=lambda s: s.cast[0] / s.cast[2])
    clips = render_clips(grays, warm, frames=4, seed=1)
    assert clips.shape == (6, 4, 48, 48, 3) and clips.dtype == np.uint8
    np.testing.assert_array_equal(clips, render_clips(grays, warm, frames=4, seed=1))
    # frames of one clip differ a little (temporal jitter), not a lot
    diffs = np.abs(clips[:, 1:].astype(int) - clips[:, :-1].astype(int)).mean()
    assert 0.5 < diffs < 40
    # the subject's colour cast is the same in every clip: red/blue ratio follows the style
    ratio = clips[..., 0].mean(axis=(1, 2, 3)) / np.maximum(clips[..., 2].mean(axis=(1, 2, 3)), 1)
    expected = warm.cast[0] / warm.cast[2]
    assert np.all(np.abs(ratio - expected) < 0.15 * expected)
    plain = render_clips(grays, None, frames=2, seed=1)
    # no style: gray faces (only per-channel sensor noise tells the channels apart)
    assert np.abs(plain[..., 0].astype(int) - plain[..., 2].astype(int)).mean() < 4
    with pytest.raises(DatasetError):
        render_clips([], warm, frames=2, seed=0)
    with pytest.raises(DatasetError):
        make_styles(0)
