"""Fixed-point encoding: the stated error bound, no wrap-around at the extremes, strict validation."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedfer.security.errors import ValidationError
from fedfer.security.quantize import FixedPointCodec, working_dtype

U = Fraction(1, 2**53)  # float64's unit roundoff


def _sum_mod(codec: FixedPointCodec, vectors: list[np.ndarray]) -> np.ndarray:
    total = np.zeros(codec.length, dtype=working_dtype(codec.modulus_bits))
    for v in vectors:
        np.add(total, v, out=total)
    return total


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 40),
    dim=st.integers(1, 16),
    bits=st.sampled_from([12, 16, 24, 32, 48]),
    clip=st.floats(0.01, 100.0),
    max_weight=st.integers(1, 50),
    seed=st.integers(0, 2**32 - 1),
)
def test_decoded_mean_within_stated_bound(n, dim, bits, clip, max_weight, seed):
    try:
        codec = FixedPointCodec(dim=dim, clip=clip, max_weight=max_weight, max_clients=n, modulus_bits=bits)
    except ValidationError:
        limit = (1 << (bits - 1)) - 1
        assert n * max_weight > limit or limit / n <= 0.5  # only when nothing fits
        return
    rng = np.random.default_rng(seed)
    xs = [rng.uniform(-2 * clip, 2 * clip, size=dim).astype(np.float32) for _ in range(n)]
    ws = [int(rng.integers(1, max_weight + 1)) for _ in range(n)]
    weighted_sum, total_weight = codec.decode_sum(
        _sum_mod(codec, [codec.encode(x, w) for x, w in zip(xs, ws, strict=True)])
    )
    assert total_weight == sum(ws)
    # The reference is exact (rationals), so the bound must cover every rounding of encode and decode, and the
    # test adds none of its own. The decoded mean is computed as AggregateResult.mean() computes it.
    clipped = [np.clip(x.astype(np.float64), -clip, clip) for x in xs]
    exact = [
        sum(w * Fraction(v[j]) for v, w in zip(clipped, ws, strict=True)) / total_weight for j in range(dim)
    ]
    decoded = weighted_sum / float(total_weight)
    bound = codec.mean_error_bound(survivors=n, total_weight=total_weight)
    assert max(abs(Fraction(d) - e) for d, e in zip(decoded.tolist(), exact, strict=True)) <= bound
    # To first order the bound is the rounding to integers (at most 0.5 / s) plus six float64 roundings of
    # size u * clip; the factor 1 + 7u covers the second-order terms and the rounding up to a float.
    assert bound <= (Fraction(1, 2) / Fraction(codec.scale) + 6 * U * Fraction(clip)) * (1 + 7 * U)


@pytest.mark.parametrize("bits", [16, 32, 40])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_no_wrap_with_every_client_at_the_extreme(bits, sign):
    n, w = 100, 7
    codec = FixedPointCodec(dim=3, clip=2.5, max_weight=w, max_clients=n, modulus_bits=bits)
    x = np.full(3, sign * 1e6, dtype=np.float64)  # clipped to +-2.5
    weighted_sum, total_weight = codec.decode_sum(_sum_mod(codec, [codec.encode(x, w)] * n))
    assert total_weight == n * w
    assert np.allclose(weighted_sum, sign * 2.5 * n * w, rtol=0, atol=n * 0.5 / codec.scale)


def test_dtypes_and_validation():
    codec = FixedPointCodec(dim=4, clip=1.0, max_weight=3, max_clients=10, modulus_bits=32)
    assert codec.encode(np.zeros(4, np.float32), 1).dtype == np.uint32
    assert working_dtype(33) is np.uint64
    with pytest.raises(ValidationError):
        codec.encode(np.array([0.0, np.nan, 0.0, 0.0]), 1)
    with pytest.raises(ValidationError):
        codec.encode(np.array([0.0, np.inf, 0.0, 0.0]), 1)
    with pytest.raises(ValidationError):
        codec.encode(np.zeros(5), 1)
    with pytest.raises(ValidationError):
        codec.encode(np.zeros(4, dtype=np.int32), 1)
    with pytest.raises(ValidationError):
        codec.encode(np.zeros(4), 4)
    with pytest.raises(ValidationError):
        codec.encode(np.zeros(4), True)
    with pytest.raises(ValidationError):
        FixedPointCodec(dim=4, clip=1, max_weight=3, max_clients=10, modulus_bits=32)  # clip must be float
    with pytest.raises(ValidationError):
        FixedPointCodec(dim=4, clip=1.0, max_weight=1000, max_clients=1000, modulus_bits=16)
    with pytest.raises(ValidationError):
        codec.decode_sum(np.zeros(4, dtype=np.uint32))
