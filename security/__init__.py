"""fedfer's pure, I/O-free privacy core.

Crypto wrappers over the ``cryptography`` package, Shamir secret sharing, fixed-point quantization, the
secure-aggregation protocol (SecAgg with the SecAgg+ neighbour graph) as client/server state machines,
differential-privacy helpers, key handles and at-rest envelope encryption. Nothing here imports the rest of
fedfer, opens a socket, reads a clock or touches a file.
"""

from fedfer.security.envelope import DataKey, KeyEncryptionKey
from fedfer.security.errors import (
    FedferError,
    IntegrityError,
    ProtocolError,
    RoundAbortedError,
    ValidationError,
)
from fedfer.security.keys import AgreementKey, IdentityKey, verify_signature
from fedfer.security.secagg import (
    AggregateResult,
    DuplicateMessageError,
    MalformedMessageError,
    SecAggClient,
    SecAggParams,
    SecAggServer,
    decode_message,
)

__all__ = [
    "AggregateResult",
    "AgreementKey",
    "DataKey",
    "DuplicateMessageError",
    "FedferError",
    "IdentityKey",
    "IntegrityError",
    "KeyEncryptionKey",
    "MalformedMessageError",
    "ProtocolError",
    "RoundAbortedError",
    "SecAggClient",
    "SecAggParams",
    "SecAggServer",
    "ValidationError",
    "decode_message",
    "verify_signature",
]
