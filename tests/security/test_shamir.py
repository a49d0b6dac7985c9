"""Shamir secret sharing: every t-subset reconstructs, t-1 shares are consistent with every secret."""

from __future__ import annotations

import itertools
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedfer.security.errors import IntegrityError, ValidationError
from fedfer.security.shamir import (
    FIELD_PRIME,
    SHARE_BYTES,
    lagrange_at_zero,
    reconstruct_secret,
    split_secret,
)


def _interpolate_at(points: dict[int, int], x: int) -> int:
    """Evaluate at x the unique polynomial of degree < len(points) through ``points`` (test-side oracle)."""
    p = FIELD_PRIME
    total = 0
    for xi, yi in points.items():
        num, den = 1, 1
        for xj in points:
            if xj != xi:
                num = num * (x - xj) % p
                den = den * (xi - xj) % p
        total = (total + yi * num * pow(den, -1, p)) % p
    return total


@pytest.mark.parametrize(("n", "t"), [(2, 2), (5, 3), (7, 4), (8, 8), (6, 1)])
def test_every_t_subset_reconstructs(n, t):
    secret = os.urandom(32)
    points = list(range(1, n + 1))
    shares = split_secret(secret, threshold=t, points=points)
    assert set(shares) == set(points) and all(len(s) == SHARE_BYTES for s in shares.values())
    for subset in itertools.combinations(points, t):
        assert reconstruct_secret({x: shares[x] for x in subset}, threshold=t, secret_len=32) == secret


@pytest.mark.parametrize(("n", "t"), [(5, 3), (7, 4), (9, 5)])
def test_t_minus_1_shares_are_consistent_with_every_secret(n, t):
    secret = os.urandom(32)
    points = list(range(1, n + 1))
    shares = split_secret(secret, threshold=t, points=points)
    for subset in itertools.combinations(points, t - 1):
        known = {x: int.from_bytes(shares[x], "big") for x in subset}
        for candidate in (bytes(32), b"\xff" * 32, os.urandom(32), secret):
            # A degree t-1 polynomial through the t-1 known shares and (0, candidate) always exists, so
            # the t-1 shares cannot rule any secret out: completing it with one forged share yields it.
            poly = dict(known)
            poly[0] = int.from_bytes(candidate, "big")
            other = next(x for x in points if x not in subset)
            forged = _interpolate_at(poly, other).to_bytes(SHARE_BYTES, "big")
            view = {x: shares[x] for x in subset} | {other: forged}
            assert reconstruct_secret(view, threshold=t, secret_len=32) == candidate


@settings(max_examples=30, deadline=None)
@given(
    secret=st.binary(min_size=1, max_size=64),
    n=st.integers(min_value=1, max_value=12),
    data=st.data(),
)
def test_random_sharings_reconstruct(secret, n, data):
    t = data.draw(st.integers(min_value=1, max_value=n))
    points = data.draw(st.lists(st.integers(1, 2**32 - 1), min_size=n, max_size=n, unique=True))
    shares = split_secret(secret, threshold=t, points=points)
    chosen = data.draw(st.permutations(points))[:t]
    got = reconstruct_secret({x: shares[x] for x in chosen}, threshold=t, secret_len=len(secret))
    assert got == secret


def test_corrupt_share_changes_or_rejects_the_secret():
    secret = os.urandom(32)
    shares = split_secret(secret, threshold=3, points=[1, 2, 3])
    bad = dict(shares)
    bad[2] = (int.from_bytes(shares[2], "big") ^ 1).to_bytes(SHARE_BYTES, "big")
    try:
        recovered = reconstruct_secret(bad, threshold=3, secret_len=32)
    except IntegrityError:
        recovered = None  # the interpolated value did not even fit 32 bytes
    assert recovered != secret


def test_too_few_shares_and_bad_arguments():
    shares = split_secret(b"s" * 32, threshold=3, points=[1, 2, 3, 4])
    with pytest.raises(ValidationError):
        reconstruct_secret({1: shares[1], 2: shares[2]}, threshold=3, secret_len=32)
    with pytest.raises(ValidationError):
        split_secret(b"s", threshold=5, points=[1, 2, 3])
    with pytest.raises(ValidationError):
        split_secret(b"s", threshold=2, points=[1, 1, 2])
    with pytest.raises(ValidationError):
        split_secret(b"s", threshold=2, points=[0, 1])
    with pytest.raises(ValidationError):
        split_secret(b"s", threshold=True, points=[1, 2])  # bool is not an int threshold
    with pytest.raises(ValidationError):
        split_secret(b"", threshold=1, points=[1])
    with pytest.raises(IntegrityError):
        reconstruct_secret({1: b"\xff" * SHARE_BYTES}, threshold=1, secret_len=32)


def test_random_seam_makes_sharing_reproducible():
    counter = iter(range(10**6))

    def fixed(n: int) -> bytes:
        return next(counter).to_bytes(n, "big")

    a = split_secret(b"k" * 32, threshold=3, points=[1, 2, 3], _random_bytes=fixed)
    counter = iter(range(10**6))
    b = split_secret(b"k" * 32, threshold=3, points=[1, 2, 3], _random_bytes=fixed)
    assert a == b


def test_lagrange_coefficients_sum_to_one():
    # Interpolating the constant polynomial 1 at 0 gives 1: the coefficients sum to 1 mod p.
    assert sum(lagrange_at_zero([3, 9, 14, 20])) % FIELD_PRIME == 1
