"""Fixed-point encoding of weighted updates into integers mod 2^k, sized so that a sum cannot wrap.

A client with update x (floats) and integer weight w (its example count, 1..W) uploads the vector
``[round(w * clip(x, -c, c) * s), w]`` as two's-complement integers mod 2^k. Summing n such vectors mod 2^k
and reading the result back as signed integers is exact as long as every partial sum stays inside
(-2^(k-1), 2^(k-1)); the scale s is chosen as the largest value for which that holds for n clients:

    n * (W * c * s + 1/2) <= 2^(k-1) - 1     and     n * W <= 2^(k-1) - 1.

Decoding divides the integer sum by s (weighted sum of updates) and reads the weight total W_tot directly.

Error bound (stated and tested): with m surviving clients of total weight W_tot, each coordinate of the
decoded mean ``weighted_sum / W_tot`` (as float64 computes it) differs from the exact weighted mean of the
*clipped* updates by at most

    q + e + g * (c + q + e),   q = m / (2 * s * W_tot),   e = (2u + u^2) * c,   g = (1 + u)^3 / (1 - u) - 1,

with u = 2^-53, float64's unit roundoff. Encoding rounds twice before ``rint``: ``fl(fl(w * s) * x)`` is
within a relative 2u + u^2 of ``w * s * x``, whose size is at most ``w * s * c``; ``rint`` then adds at most
1/2 per client. Summed over the clients and divided by ``s * W_tot`` those are e and q. The integer sum is
exact (no wrap, by the choice of s). Decoding rounds three more times (the integer sum to float64, ``/ s``,
``/ W_tot``) and W_tot itself may round to float64: a relative error of at most g on a value of size at most
c + q + e. To first order the bound is ``m * 0.5 / (s * W_tot) + 6u * c`` (<= 0.5 / s + 6u * c, since every
weight is >= 1); the float64 term matters at large k, where 0.5 / s shrinks toward u * c.
:meth:`FixedPointCodec.mean_error_bound` evaluates the expression exactly and rounds it up to a float.
Values outside [-c, c] are clipped first; that is a deliberate bound on each client's influence, not error.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import numpy.typing as npt

from fedfer.security.errors import ValidationError

__all__ = ["FixedPointCodec", "working_dtype"]

_U = Fraction(1, 2**53)  # float64's unit roundoff (round to nearest)
_ENCODE_ROUNDING = 2 * _U + _U**2  # relative error of fl(fl(w * s) * x)
_DECODE_ROUNDING = (1 + _U) ** 3 / (1 - _U) - 1  # relative error of fl(fl(fl(sum) / s) / fl(W_tot))


def working_dtype(modulus_bits: int) -> type[np.unsignedinteger]:
    """The unsigned dtype in which vectors mod 2^k are held and masked (uint32 for k <= 32, else uint64)."""
    return np.uint32 if modulus_bits <= 32 else np.uint64


class FixedPointCodec:
    """Encode (update, weight) pairs into integers mod 2^k and decode their sums.

    Args:
        dim: length of the float update (the encoded vector has ``dim + 1`` elements, the last is the weight).
        clip: c > 0; each update coordinate is clipped to [-c, c].
        max_weight: W >= 1, the largest weight a client may claim.
        max_clients: n >= 1, the most vectors that will ever be summed.
        modulus_bits: k in 8..62.

    Raises:
        ValidationError: if no positive scale keeps n weighted vectors from wrapping mod 2^k.
    """

    __slots__ = ("_clip", "_dim", "_half", "_k", "_mask", "_max_clients", "_max_weight", "_scale")

    def __init__(
        self, *, dim: int, clip: float, max_weight: int, max_clients: int, modulus_bits: int
    ) -> None:
        if type(dim) is not int or dim < 1:
            raise ValidationError("dim must be a positive int")
        if type(clip) is not float or not math.isfinite(clip) or clip <= 0.0:
            raise ValidationError("clip must be a finite positive float")
        if type(max_weight) is not int or max_weight < 1:
            raise ValidationError("max_weight must be a positive int")
        if type(max_clients) is not int or max_clients < 1:
            raise ValidationError("max_clients must be a positive int")
        if type(modulus_bits) is not int or not 8 <= modulus_bits <= 62:
            raise ValidationError("modulus_bits must be an int in 8..62")
        limit = (1 << (modulus_bits - 1)) - 1
        if max_clients * max_weight > limit:
            raise ValidationError("total weight of max_clients could wrap mod 2^k; raise modulus_bits")
        scale = (limit / max_clients - 0.5) / (max_weight * clip)
        # Guard against float rounding pushing the bound over the limit.
        scale *= 1.0 - 1e-12
        if not scale > 0.0:
            raise ValidationError(
                "no positive fixed-point scale fits; raise modulus_bits or lower clip/weights"
            )
        self._dim = dim
        self._clip = clip
        self._max_weight = max_weight
        self._max_clients = max_clients
        self._k = modulus_bits
        self._mask = (1 << modulus_bits) - 1
        self._half = 1 << (modulus_bits - 1)
        self._scale = scale

    @property
    def dim(self) -> int:
        """Length of the float update."""
        return self._dim

    @property
    def length(self) -> int:
        """Length of the encoded vector (``dim + 1``)."""
        return self._dim + 1

    @property
    def scale(self) -> float:
        """The fixed-point scale s."""
        return self._scale

    @property
    def modulus_bits(self) -> int:
        """k: vectors live in Z / 2^k."""
        return self._k

    def encode(self, update: npt.NDArray[np.floating], weight: int) -> npt.NDArray[np.unsignedinteger]:
        """Encode one client's update and weight.

        Args:
            update: 1-D float array of length ``dim`` (finite values).
            weight: integer weight in 1..max_weight (example count).

        Returns:
            A fresh array of ``dim + 1`` elements of :func:`working_dtype` holding values mod 2^k.

        Raises:
            ValidationError: on wrong shape/dtype, non-finite values or a weight out of range.
        """
        if type(weight) is not int or not 1 <= weight <= self._max_weight:
            raise ValidationError("weight must be an int in 1..max_weight")
        if not isinstance(update, np.ndarray) or update.ndim != 1 or update.shape[0] != self._dim:
            raise ValidationError(f"update must be a 1-D array of length {self._dim}")
        if update.dtype.kind != "f":
            raise ValidationError("update must be a float array")
        if not np.all(np.isfinite(update)):
            raise ValidationError("update must be finite")
        x = np.clip(update.astype(np.float64), -self._clip, self._clip)
        x *= float(weight) * self._scale
        q = np.empty(self._dim + 1, dtype=np.int64)
        np.rint(x, out=q[: self._dim], casting="unsafe")
        q[self._dim] = weight
        as_unsigned = q.view(np.uint64)
        as_unsigned &= np.uint64(self._mask)
        return as_unsigned.astype(working_dtype(self._k))

    def decode_sum(self, total: npt.NDArray[np.unsignedinteger]) -> tuple[npt.NDArray[np.float64], int]:
        """Decode a sum (mod 2^k) of encoded vectors.

        Args:
            total: the unmasked sum, ``dim + 1`` unsigned integers (reduced mod 2^k here).

        Returns:
            ``(weighted_sum, total_weight)``: float64 array of length ``dim`` and the integer weight total.

        Raises:
            ValidationError: on a wrong shape or dtype.
        """
        if not isinstance(total, np.ndarray) or total.shape != (self._dim + 1,) or total.dtype.kind != "u":
            raise ValidationError(f"total must be an unsigned array of length {self._dim + 1}")
        v = (total.astype(np.uint64) & np.uint64(self._mask)).astype(np.int64)
        signed = np.where(v >= self._half, v - (1 << self._k), v)
        weighted_sum = signed[: self._dim].astype(np.float64) / self._scale
        total_weight = int(signed[self._dim])
        return weighted_sum, total_weight

    def mean_error_bound(self, *, survivors: int, total_weight: int) -> float:
        """Largest possible |decoded mean - exact weighted mean of clipped updates| per coordinate.

        The decoded mean is ``weighted_sum / float(W_tot)`` in float64, from :meth:`decode_sum`.

        Args:
            survivors: number of summed vectors m.
            total_weight: W_tot, the sum of their weights.

        Returns:
            ``q + e + g * (c + q + e)`` of the module docstring (the rounding to integers and every float64
            rounding of encode and decode), computed exactly and rounded up to the next float.
        """
        if type(survivors) is not int or survivors < 1 or type(total_weight) is not int or total_weight < 1:
            raise ValidationError("survivors and total_weight must be positive ints")
        clip = Fraction(self._clip)
        to_integers = Fraction(survivors, 2 * total_weight) / Fraction(self._scale)
        products = _ENCODE_ROUNDING * clip
        bound = to_integers + products + _DECODE_ROUNDING * (clip + to_integers + products)
        nearest = float(bound)
        return nearest if Fraction(nearest) >= bound else math.nextafter(nearest, math.inf)

    def __repr__(self) -> str:
        return (
            f"FixedPointCodec(dim={self._dim}, clip={self._clip}, max_weight={self._max_weight}, "
            f"max_clients={self._max_clients}, modulus_bits={self._k})"
        )
