"""The v update a device contributes to a round, with optional user-level DP.

``Δv = v_personal - v_central`` over the named arrays; with user-level DP the device clips Δv in L2 (over all
arrays together) and adds its share ``sigma * C / sqrt(n)`` of Gaussian noise from the OS CSPRNG
(:func:`security.dp.privatize_update`), so the sum secure aggregation reveals carries ``N(0, (sigma C)^2)``.
The per-round and cumulative epsilon come from :class:`security.dp.GaussianAccountant`.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from security.dp import privatize_update
from security.errors import ValidationError

__all__ = ["apply_update", "model_delta", "private_delta"]


def _check_same(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> list[str]:
    if set(a) != set(b) or any(np.shape(a[k]) != np.shape(b[k]) for k in a):
        raise ValidationError("named arrays differ in names or shapes")
    return sorted(a)


def model_delta(
    central: Mapping[str, np.ndarray], personal: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """``personal - central`` per named array (float64)."""
    return {
        k: np.asarray(personal[k], np.float64) - np.asarray(central[k], np.float64)
        for k in _check_same(central, personal)
    }


def private_delta(
    delta: Mapping[str, np.ndarray], *, max_norm: float, noise_multiplier: float, num_clients: int
) -> dict[str, np.ndarray]:
    """Clip the update to ``max_norm`` (one L2 norm over all arrays) and add this client's noise share."""
    names = sorted(delta)
    if not names:
        raise ValidationError("empty update")
    flat = np.concatenate([np.asarray(delta[k], np.float64).ravel() for k in names])
    noised = privatize_update(
        flat, max_norm=max_norm, noise_multiplier=noise_multiplier, num_clients=num_clients
    )
    out: dict[str, np.ndarray] = {}
    pos = 0
    for k in names:
        shape = np.shape(delta[k])
        size = int(np.prod(shape, dtype=np.int64))
        out[k] = noised[pos : pos + size].reshape(shape)
        pos += size
    return out


def apply_update(central: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``central + delta`` as float32 named arrays (e.g. the aggregate mean applied to the central v)."""
    return {
        k: (np.asarray(central[k], np.float64) + delta[k]).astype(np.float32)
        for k in _check_same(central, delta)
    }
