"""The project's exception hierarchy.

Every error fedfer raises on purpose derives from :class:`FedferError`. Messages never contain key material,
plaintext features or frames: they say *what* failed, not the data it failed on.
"""

from __future__ import annotations

__all__ = [
    "FedferError",
    "IntegrityError",
    "ProtocolError",
    "RoundAbortedError",
    "ValidationError",
]


class FedferError(Exception):
    """Root of every error raised deliberately by fedfer."""


class ValidationError(FedferError, ValueError):
    """An argument, configuration value or message field is malformed or out of range."""


class IntegrityError(FedferError):
    """Authenticated data failed verification (tampered, truncated, wrong key or wrong associated data).

    Deliberately uninformative: callers learn that verification failed, never why.
    """


class ProtocolError(FedferError):
    """A protocol message arrived in the wrong stage, from the wrong party, twice, or with wrong types."""


class RoundAbortedError(FedferError):
    """A secure-aggregation round cannot complete (for example, fewer survivors than the threshold)."""
