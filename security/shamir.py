"""Shamir t-of-n secret sharing over the prime field GF(2^521 - 1).

A secret of up to 64 bytes is read as a big-endian integer s < 2^512 < p, the constant term of a random
polynomial of degree t-1; the share for party x (an integer 1..2^32-1, in secure aggregation the client id) is
the polynomial's value at x. Any t shares recover s by Lagrange interpolation at 0; any t-1 shares are
consistent with every possible secret (information-theoretic hiding). p = 2^521 - 1 is a Mersenne prime, so
shares are fixed-width 66-byte big-endian integers.

Coefficients are drawn uniformly from the field by rejection sampling from a random-byte source (the OS
CSPRNG unless a test passes the private ``_random_bytes`` seam).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache

from fedfer.security.crypto import RandomBytes
from fedfer.security.errors import IntegrityError, ValidationError

__all__ = [
    "FIELD_PRIME",
    "MAX_SECRET_BYTES",
    "SHARE_BYTES",
    "lagrange_at_zero",
    "reconstruct_secret",
    "split_secret",
]

FIELD_PRIME = (1 << 521) - 1
SHARE_BYTES = 66
MAX_SECRET_BYTES = 64
_MAX_X = (1 << 32) - 1


def _field_element(random_bytes: RandomBytes) -> int:
    """Uniform element of GF(p) by rejection sampling 521-bit integers (rejects only the value p)."""
    while True:
        raw = random_bytes(SHARE_BYTES)
        if type(raw) is not bytes or len(raw) != SHARE_BYTES:
            raise ValidationError("random source returned malformed bytes")
        value = int.from_bytes(raw, "big") & FIELD_PRIME
        if value < FIELD_PRIME:
            return value


def _check_xs(xs: Iterable[int]) -> tuple[int, ...]:
    out = tuple(xs)
    for x in out:
        if type(x) is not int or not 1 <= x <= _MAX_X:
            raise ValidationError("share points must be ints in 1..2^32-1")
    if len(set(out)) != len(out):
        raise ValidationError("share points must be distinct")
    return out


def split_secret(
    secret: bytes,
    *,
    threshold: int,
    points: Sequence[int],
    _random_bytes: RandomBytes = os.urandom,
) -> dict[int, bytes]:
    """Split ``secret`` into one share per point so that any ``threshold`` shares recover it.

    Args:
        secret: 1..64 bytes.
        threshold: t, with 1 <= t <= len(points).
        points: distinct evaluation points (ints in 1..2^32-1), typically client ids.
        _random_bytes: private test seam; production uses the OS CSPRNG.

    Returns:
        ``{point: 66-byte share}``.

    Raises:
        ValidationError: on bad secret length, threshold or points.
    """
    if type(secret) is not bytes or not 1 <= len(secret) <= MAX_SECRET_BYTES:
        raise ValidationError(f"secret must be 1..{MAX_SECRET_BYTES} bytes")
    xs = _check_xs(points)
    if type(threshold) is not int or not 1 <= threshold <= len(xs):
        raise ValidationError("threshold must be an int in 1..number of points")
    coefficients = [int.from_bytes(secret, "big")]
    coefficients.extend(_field_element(_random_bytes) for _ in range(threshold - 1))
    coefficients.reverse()  # Horner order: highest degree first
    p = FIELD_PRIME
    shares: dict[int, bytes] = {}
    for x in xs:
        acc = 0
        for c in coefficients:
            acc = (acc * x + c) % p
        shares[x] = acc.to_bytes(SHARE_BYTES, "big")
    return shares


@lru_cache(maxsize=4096)
def _lagrange_cached(xs: tuple[int, ...]) -> tuple[int, ...]:
    p = FIELD_PRIME
    nums = []
    dens = []
    for i, xi in enumerate(xs):
        num = 1
        den = 1
        for j, xj in enumerate(xs):
            if i != j:
                num = num * xj % p
                den = den * (xj - xi) % p
        nums.append(num)
        dens.append(den)
    # Montgomery's trick: one modular inversion for all denominators.
    prefix = [1]
    for d in dens:
        prefix.append(prefix[-1] * d % p)
    inv = pow(prefix[-1], -1, p)
    inverses = [0] * len(dens)
    for i in range(len(dens) - 1, -1, -1):
        inverses[i] = inv * prefix[i] % p
        inv = inv * dens[i] % p
    return tuple(n * d % p for n, d in zip(nums, inverses, strict=True))


def lagrange_at_zero(points: Sequence[int]) -> tuple[int, ...]:
    """Lagrange basis coefficients that evaluate the interpolating polynomial at 0 (cached per point set).

    Args:
        points: distinct evaluation points.

    Returns:
        One field coefficient per point, in the same order.
    """
    return _lagrange_cached(_check_xs(points))


def reconstruct_secret(shares: Mapping[int, bytes], *, threshold: int, secret_len: int) -> bytes:
    """Recover a secret from at least ``threshold`` shares (the first ``threshold`` by point are used).

    Args:
        shares: ``{point: 66-byte share}``.
        threshold: t used when splitting.
        secret_len: the secret's length in bytes.

    Returns:
        The secret.

    Raises:
        ValidationError: on too few shares or malformed arguments.
        IntegrityError: if the interpolated value cannot be a secret of that length (corrupt shares).
    """
    if type(threshold) is not int or threshold < 1:
        raise ValidationError("threshold must be a positive int")
    if type(secret_len) is not int or not 1 <= secret_len <= MAX_SECRET_BYTES:
        raise ValidationError(f"secret_len must be in 1..{MAX_SECRET_BYTES}")
    if len(shares) < threshold:
        raise ValidationError("not enough shares to reconstruct")
    xs = sorted(shares)[:threshold]
    ys = []
    for x in xs:
        share = shares[x]
        if type(share) is not bytes or len(share) != SHARE_BYTES:
            raise ValidationError(f"shares must be {SHARE_BYTES} bytes")
        y = int.from_bytes(share, "big")
        if y >= FIELD_PRIME:
            raise IntegrityError("share out of field range")
        ys.append(y)
    lam = lagrange_at_zero(xs)
    secret = sum(li * yi for li, yi in zip(lam, ys, strict=True)) % FIELD_PRIME
    if secret >> (8 * secret_len):
        raise IntegrityError("shares are inconsistent")
    return secret.to_bytes(secret_len, "big")
