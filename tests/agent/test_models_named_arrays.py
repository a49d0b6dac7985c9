"""v's named arrays are identical with and without DP (DPLSTM) and round-trip exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedfer.agent.models.video import VideoModel, from_named_arrays, to_named_arrays
from fedfer.security.errors import ValidationError


def test_named_arrays_are_the_same_with_and_without_dp() -> None:
    torch.manual_seed(1)
    plain = VideoModel(num_classes=6)
    dp = VideoModel(num_classes=6, dp=True)
    a, b = to_named_arrays(plain), to_named_arrays(dp)
    assert list(a) == list(b)
    assert all(a[k].shape == b[k].shape and a[k].dtype == np.float32 for k in a)
    assert not any(".l0." in k for k in b)  # DPLSTM's alias keys never travel
    # plain -> dp -> plain gives back the same arrays and the same outputs.
    from_named_arrays(dp, a)
    back = VideoModel(num_classes=6)
    from_named_arrays(back, to_named_arrays(dp))
    for k in a:
        np.testing.assert_array_equal(to_named_arrays(back)[k], a[k])
    x = torch.randn(3, 5, 1280)
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(x), dp.eval()(x), rtol=1e-5, atol=1e-5)


def test_named_arrays_through_an_opacus_wrapper() -> None:
    from opacus import GradSampleModule

    dp = VideoModel(num_classes=4, dp=True)
    wrapped = GradSampleModule(dp)
    assert to_named_arrays(wrapped).keys() == to_named_arrays(VideoModel(num_classes=4)).keys()


def test_from_named_arrays_rejects_bad_input() -> None:
    m = VideoModel(num_classes=6)
    arrays = to_named_arrays(m)
    with pytest.raises(ValidationError):
        from_named_arrays(m, {k: v for k, v in arrays.items() if k != "out.bias"})
    bad = dict(arrays)
    bad["out.bias"] = np.zeros(7, np.float32)
    with pytest.raises(ValidationError):
        from_named_arrays(m, bad)
    bad["out.bias"] = np.full(6, np.nan, np.float32)
    with pytest.raises(ValidationError):
        from_named_arrays(m, bad)
    with pytest.raises(ValidationError):
        from_named_arrays(VideoModel(num_classes=4), arrays)
