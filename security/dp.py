"""Differential-privacy math for user-level DP in federated rounds (pure; no torch, no I/O).

Each client clips its model update to an L2 norm bound and adds its *share* of Gaussian noise: with ``n``
clients each adding ``N(0, (sigma * C)^2 / n)``, the sum that secure aggregation reveals carries
``N(0, (sigma * C)^2)``, i.e. the Gaussian mechanism with noise multiplier ``sigma`` on a sum of sensitivity
``C`` (McMahan et al. 2018; distributed DP as in Kairouz et al. 2021). The noise is drawn from the OS CSPRNG
(``os.urandom``) and shaped with the Box-Muller transform, never from numpy's predictable generators.

The accountant is the Rényi-DP accountant of the (non-subsampled) Gaussian mechanism: a round with noise
multiplier ``sigma`` is ``(alpha, alpha / (2 sigma^2))``-RDP for every order ``alpha > 1``; rounds compose by
adding RDP, and ``(epsilon, delta)`` follows from the conversion of Balle et al. 2020
(``eps = rdp + log((alpha-1)/alpha) - (log(delta) + log(alpha)) / (alpha-1)``), minimized over orders.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence

import numpy as np

from fedfer.security.errors import ValidationError

__all__ = [
    "DEFAULT_ORDERS",
    "GaussianAccountant",
    "clip_by_l2",
    "gaussian_epsilon",
    "gaussian_noise",
    "noise_share_std",
    "privatize_update",
]

DEFAULT_ORDERS: tuple[float, ...] = (
    1.25,
    1.5,
    1.75,
    2.0,
    2.5,
    3.0,
    3.5,
    4.0,
    5.0,
    6.0,
    7.0,
    8.0,
    10.0,
    12.0,
    14.0,
    16.0,
    20.0,
    24.0,
    28.0,
    32.0,
    48.0,
    64.0,
    96.0,
    128.0,
    256.0,
    512.0,
    1024.0,
)

# A source of uniformly random bytes; production uses os.urandom, tests may inject a fixed stream.
ByteSource = Callable[[int], bytes]


def _check_positive(name: str, value: float) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValidationError(f"{name} must be a positive finite number")


def clip_by_l2(update: np.ndarray, max_norm: float) -> tuple[np.ndarray, float]:
    """Scale ``update`` so its L2 norm is at most ``max_norm``.

    Args:
        update: a flat or shaped float array (one client's model delta).
        max_norm: the clipping bound ``C`` (> 0).

    Returns:
        ``(clipped, original_norm)`` with ``clipped`` as float64; the input is not modified.

    Raises:
        ValidationError: ``max_norm`` is not positive or ``update`` holds non-finite values.
    """
    _check_positive("max_norm", max_norm)
    arr = np.asarray(update, dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValidationError("update holds non-finite values")
    norm = float(np.linalg.norm(arr.ravel()))
    scale = min(1.0, max_norm / norm) if norm > 0 else 1.0
    return arr * scale, norm


def gaussian_noise(shape: Sequence[int] | int, std: float, *, source: ByteSource = os.urandom) -> np.ndarray:
    """Gaussian noise ``N(0, std^2)`` of ``shape`` from the OS CSPRNG (Box-Muller over 53-bit uniforms).

    Args:
        shape: the array shape.
        std: the standard deviation (>= 0).
        source: where uniform random bytes come from (``os.urandom``; injectable only for tests).

    Returns:
        A float64 array.
    """
    if isinstance(std, bool) or not isinstance(std, int | float) or not math.isfinite(std) or std < 0:
        raise ValidationError("std must be a non-negative finite number")
    dims = (shape,) if isinstance(shape, int) else tuple(shape)
    if any(type(d) is not int or d < 0 for d in dims):
        raise ValidationError("shape must hold non-negative ints")
    count = int(np.prod(dims, dtype=np.int64))
    pairs = (count + 1) // 2
    raw = np.frombuffer(source(16 * pairs), dtype="<u8").reshape(pairs, 2)
    # 53 random bits -> uniform in (0, 1]; u1 > 0 keeps log finite.
    u = ((raw >> np.uint64(11)).astype(np.float64) + 1.0) * (1.0 / 9007199254740992.0)
    radius = np.sqrt(-2.0 * np.log(u[:, 0]))
    angle = 2.0 * math.pi * u[:, 1]
    z = np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:count]
    return (z * float(std)).reshape(dims)


def noise_share_std(noise_multiplier: float, max_norm: float, num_clients: int) -> float:
    """Per-client noise std so ``num_clients`` shares sum to ``N(0, (noise_multiplier * max_norm)^2)``."""
    _check_positive("noise_multiplier", noise_multiplier)
    _check_positive("max_norm", max_norm)
    if type(num_clients) is not int or num_clients < 1:
        raise ValidationError("num_clients must be a positive int")
    return noise_multiplier * max_norm / math.sqrt(num_clients)


def privatize_update(
    update: np.ndarray,
    *,
    max_norm: float,
    noise_multiplier: float,
    num_clients: int,
    source: ByteSource = os.urandom,
) -> np.ndarray:
    """One client's user-level DP step: clip ``update`` to ``max_norm`` and add its noise share.

    Args:
        update: the client's model delta (any shape).
        max_norm: L2 clipping bound ``C``.
        noise_multiplier: ``sigma`` of the aggregate Gaussian mechanism.
        num_clients: how many clients contribute to the sum (the noise is split among them).
        source: random bytes (``os.urandom``; injectable only for tests).

    Returns:
        The clipped, noised update (float64, same shape).
    """
    clipped, _ = clip_by_l2(update, max_norm)
    std = noise_share_std(noise_multiplier, max_norm, num_clients)
    noise = gaussian_noise(clipped.shape, std, source=source)
    return np.asarray(clipped + noise, dtype=np.float64)


def _rdp_to_epsilon(rdp: Sequence[float], orders: Sequence[float], delta: float) -> tuple[float, float]:
    best_eps, best_order = math.inf, orders[0]
    for r, a in zip(rdp, orders, strict=True):
        eps = r + math.log((a - 1) / a) - (math.log(delta) + math.log(a)) / (a - 1)
        if eps < best_eps:
            best_eps, best_order = eps, a
    return max(best_eps, 0.0), best_order


def gaussian_epsilon(
    noise_multiplier: float, rounds: int, delta: float, *, orders: Sequence[float] = DEFAULT_ORDERS
) -> float:
    """Epsilon after ``rounds`` compositions of the Gaussian mechanism with ``noise_multiplier``.

    Args:
        noise_multiplier: sigma (noise std over sensitivity).
        rounds: number of releases (>= 0).
        delta: target delta in (0, 1).
        orders: RDP orders to optimize over.

    Returns:
        The smallest epsilon over ``orders`` (0.0 for zero rounds).
    """
    acc = GaussianAccountant(delta=delta, orders=orders)
    for _ in range(rounds):
        acc.step(noise_multiplier)
    return acc.epsilon()


class GaussianAccountant:
    """RDP accountant for a sequence of Gaussian releases (user-level DP over federated rounds).

    Args:
        delta: target delta in (0, 1).
        orders: RDP orders (> 1) to track.
    """

    def __init__(self, *, delta: float, orders: Sequence[float] = DEFAULT_ORDERS) -> None:
        if isinstance(delta, bool) or not isinstance(delta, float) or not 0.0 < delta < 1.0:
            raise ValidationError("delta must be a float in (0, 1)")
        if not orders or any(not isinstance(a, int | float) or a <= 1 for a in orders):
            raise ValidationError("orders must be numbers > 1")
        self.delta = delta
        self.orders = tuple(float(a) for a in orders)
        self._rdp = [0.0] * len(self.orders)
        self.rounds = 0

    def step(self, noise_multiplier: float) -> float:
        """Record one release with ``noise_multiplier``; returns that round's epsilon on its own."""
        _check_positive("noise_multiplier", noise_multiplier)
        per_round = [a / (2.0 * noise_multiplier**2) for a in self.orders]
        self._rdp = [r + p for r, p in zip(self._rdp, per_round, strict=True)]
        self.rounds += 1
        return _rdp_to_epsilon(per_round, self.orders, self.delta)[0]

    def epsilon(self) -> float:
        """Cumulative epsilon at ``delta`` over every recorded round (0.0 before the first)."""
        if self.rounds == 0:
            return 0.0
        return _rdp_to_epsilon(self._rdp, self.orders, self.delta)[0]

    def __repr__(self) -> str:
        return f"GaussianAccountant(rounds={self.rounds}, delta={self.delta:g}, epsilon={self.epsilon():.3f})"
