"""fedfer's pure privacy core.

Crypto wrappers over the ``cryptography`` package, Shamir secret sharing, fixed-point quantization, the
secure-aggregation protocol (SecAgg with the SecAgg+ neighbour graph) as client/server state machines and the
round's :class:`~fedfer.security.secagg.stage.Stage`, differential-privacy helpers, key handles and at-rest
envelope encryption. Nothing here imports the rest of fedfer, opens a socket or reads a clock; the one module
that touches a file is :mod:`fedfer.security.files` (``write_atomic``, the durable write that the device's and
the aggregator's secrets and ledgers share).
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
