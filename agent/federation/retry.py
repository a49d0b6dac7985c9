"""Retry transient gRPC failures with capped exponential backoff and full jitter.

Only ``UNAVAILABLE`` and ``DEADLINE_EXCEEDED`` are retried: they mean the request may not have reached the
aggregator (or its answer was lost), or the aggregator could not store it yet (its disk is full: "aggregator
storage is full, retry later"), and every mutating request carries an idempotency key, so sending it again
is harmless. Every other status is a decision of the aggregator and is raised at once. A caller that knows
until when its request is still useful (the stage deadline) passes ``until`` and keeps retrying up to then,
beyond the policy's attempt count.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc

from fedfer.security.errors import ValidationError

__all__ = ["RETRYABLE", "RetryPolicy", "call_with_retry"]

_log = logging.getLogger(__name__)
T = TypeVar("T")

RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


class RetryPolicy:
    """How often and how patiently to retry a transient failure.

    Args:
        attempts: total attempts including the first (>= 1).
        initial_s: upper bound of the first backoff sleep, in seconds.
        max_s: cap on any single backoff sleep, in seconds.
        multiplier: growth factor of the bound per attempt (>= 1).
    """

    def __init__(
        self, *, attempts: int = 8, initial_s: float = 0.2, max_s: float = 5.0, multiplier: float = 2.0
    ) -> None:
        if type(attempts) is not int or attempts < 1:
            raise ValidationError("attempts must be an int >= 1")
        for name, value in (("initial_s", initial_s), ("max_s", max_s), ("multiplier", multiplier)):
            if not isinstance(value, int | float) or isinstance(value, bool) or not value > 0:
                raise ValidationError(f"{name} must be a positive number")
        if multiplier < 1 or max_s < initial_s:
            raise ValidationError("need multiplier >= 1 and max_s >= initial_s")
        self.attempts = attempts
        self.initial_s = float(initial_s)
        self.max_s = float(max_s)
        self.multiplier = float(multiplier)

    def delay(self, attempt: int) -> float:
        """Sleep before retry ``attempt`` (0-based): uniform in [0, min(max_s, initial_s * mult**attempt)].

        Jitter is "full jitter" so that many devices that failed together do not retry together.
        """
        bound = min(self.max_s, self.initial_s * self.multiplier**attempt)
        return bound * (secrets.randbelow(1_000_001) / 1_000_000)

    def __repr__(self) -> str:
        return f"RetryPolicy(attempts={self.attempts}, initial_s={self.initial_s}, max_s={self.max_s})"


async def call_with_retry(
    fn: Callable[[], Awaitable[T]],
    *,
    policy: RetryPolicy,
    what: str,
    until: float | None = None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    clock: Callable[[], float] = time.time,
) -> T:
    """Await ``fn()`` and retry it on a transient gRPC status, following ``policy``.

    Args:
        fn: makes one attempt (a fresh call each time; it must reuse the same idempotency key).
        policy: attempts and backoff.
        what: short label for log lines (never request contents).
        until: unix time up to which a transient failure is retried even after ``policy.attempts`` (the
            stage deadline of a stage message); None: the attempt count alone decides.
        sleep: the sleep used between attempts (a seam for tests).
        clock: unix time (a seam for tests).

    Returns:
        The first successful result.

    Raises:
        grpc.aio.AioRpcError: a non-retryable status, or the last transient one once attempts are spent.
    """
    attempt = 0
    while True:
        try:
            return await fn()
        except grpc.aio.AioRpcError as exc:
            attempt += 1
            if exc.code() not in RETRYABLE:
                raise
            pause = policy.delay(attempt - 1)
            if attempt >= policy.attempts and (until is None or clock() + pause >= until):
                raise
            _log.info("%s: %s, retry %d in %.2fs", what, exc.code().name, attempt, pause)
            await sleep(pause)
