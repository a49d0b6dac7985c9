"""fedfer's pure, I/O-free privacy core.

Crypto wrappers over the ``cryptography`` package, Shamir secret sharing, fixed-point quantization, the
secure-aggregation protocol (SecAgg with the SecAgg+ neighbour graph) as client/server state machines,
differential-privacy helpers, key handles and at-rest envelope encryption. Nothing here imports the rest of
fedfer, opens a socket, reads a clock or touches a file.
"""

from security.errors import FedferError, IntegrityError, ProtocolError, RoundAbortedError, ValidationError

__all__ = [
    "FedferError",
    "IntegrityError",
    "ProtocolError",
    "RoundAbortedError",
    "ValidationError",
]
