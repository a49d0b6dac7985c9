"""Secure aggregation: SecAgg (Bonawitz et al., CCS 2017) with SecAgg+ neighbour graphs (Bell et al., 2020).

Protocol. Clients 1..n of a round each hold an Ed25519 identity key whose public half the transport knows
from the device certificate / registry. (1) Each client advertises two fresh X25519 public keys and a
SHA-256 commitment to its self-mask seed b_u (with a fresh nonce r_u), all signed by its identity key. (2) It
verifies its neighbours' signed keys and Shamir t-of-|H(u)| shares the opening r_u || b_u and its mask private
key among its neighbours and itself, each share AES-256-GCM encrypted under its own single-use key expanded
from the secret it agrees with the receiver (associated data = round digest, sender, receiver, kind).
(3) It uploads y_u = encode(w_u * x_u, w_u) + PRG(b_u) + sum_v ±PRG(s_uv) mod 2^k, with s_uv agreed
pairwise by X25519 + HKDF and PRG = AES-256-CTR. (4) Consistency check: the server announces the survivor set
U3, each survivor signs it once with its identity key, and the server forwards the signatures. (5) Holding t
signatures of its holders (itself included) over the set it signed, each survivor reveals its own seed share
and the keys that open the share ciphertexts it holds of the survivors' openings and of the dropped clients'
mask keys (never both for one client); the server decrypts the ciphertexts it routed, checks the
reconstructed openings against the signed commitments (the mask keys against the advertised public keys),
removes the self masks and the dropped clients' pairwise masks, decodes sum(w_u x_u) and sum(w_u) and checks
them against the clip and weight bounds. The neighbour graph is complete (SecAgg) or a random k-regular ring
(SecAgg+), fixed by the round id.

Threat model. A server possibly colluding with c of a client's t-of-h share holders (h = k + 1; h = n for
the complete graph), where the colluders hand over everything they hold. If the server reports dropouts
truthfully (honest-but-curious), it learns only the sum of the survivors' weighted updates and their total
weight for any c <= t - 1. If it also lies, telling some holders that a client dropped and others that it
survived, it can collect both of that client's secrets exactly when c >= 2t - h
(:attr:`SecAggParams.colluders_tolerated_by_lying_server`; choose t with :func:`threshold_for_colluders`).
The consistency check makes every honest client that reveals shares hold t signatures of its holders over
the very survivor set it signed: for the complete graph and c < 2t - n any two such quorums share an honest
signer, so all honest clients act on one survivor set (Bonawitz et al.'s argument); for SecAgg+ the quorum
is each client's own neighbourhood. Signatures over the round keys stop a server from substituting keys (no
man in the middle on the shares); AEAD associated data stops shares being redirected, swapped or replayed
across rounds; a client refuses to reveal both secrets of one peer. Malicious clients: a holder cannot
substitute a share (a wrong key opens nothing and is refused and named), a dealer whose shares miss its
commitment makes the round abort naming it, and an aggregate no clipped, weighted inputs can produce aborts
the round; a client that stays inside the clip and weight bounds is not detected (norm-bound proofs would be
needed, see ``docs/secure-aggregation.md``).

Error bound. Updates are clipped to [-c, c], multiplied by the integer weight and scaled by s (the largest
scale for which n clients cannot wrap mod 2^k), then rounded. The decoded mean differs from the exact weighted
mean of the clipped updates by at most ``m * 0.5 / (s * W_tot)`` per coordinate for m survivors of total
weight W_tot (<= 0.5 / s), plus float64's rounding of encode and decode (about ``6 * 2^-53 * c``; derived in
:mod:`fedfer.security.quantize`); :attr:`AggregateResult.error_bound` reports it for each round.

Drive it with :class:`SecAggServer` and one :class:`SecAggClient` per device; both are pure state machines,
moving through the round's :class:`Stage` (:mod:`fedfer.security.secagg.stage`, the one stage enum of every
layer).
"""

from fedfer.security.secagg._wire import MalformedMessageError
from fedfer.security.secagg.client import SecAggClient
from fedfer.security.secagg.graph import NeighbourGraph
from fedfer.security.secagg.messages import (
    STAGE_MESSAGE,
    AdvertiseKeys,
    ConsistencyRequest,
    ConsistencySignature,
    EncryptedShare,
    KeysBroadcast,
    MaskedInput,
    Message,
    RevealedKey,
    ShareKeys,
    SharesBroadcast,
    SignedSurvivors,
    UnmaskRequest,
    UnmaskResponse,
    decode_message,
)
from fedfer.security.secagg.params import (
    SecAggParams,
    default_neighbors,
    default_threshold,
    threshold_for_colluders,
)
from fedfer.security.secagg.server import (
    AggregateResult,
    DuplicateMessageError,
    InvalidAggregateError,
    MisbehaviourError,
    SecAggServer,
    ShareVerificationError,
)
from fedfer.security.secagg.stage import COLLECTING, Stage

__all__ = [
    "COLLECTING",
    "STAGE_MESSAGE",
    "AdvertiseKeys",
    "AggregateResult",
    "ConsistencyRequest",
    "ConsistencySignature",
    "DuplicateMessageError",
    "EncryptedShare",
    "InvalidAggregateError",
    "KeysBroadcast",
    "MalformedMessageError",
    "MaskedInput",
    "Message",
    "MisbehaviourError",
    "NeighbourGraph",
    "RevealedKey",
    "SecAggClient",
    "SecAggParams",
    "SecAggServer",
    "ShareKeys",
    "ShareVerificationError",
    "SharesBroadcast",
    "SignedSurvivors",
    "Stage",
    "UnmaskRequest",
    "UnmaskResponse",
    "decode_message",
    "default_neighbors",
    "default_threshold",
    "threshold_for_colluders",
]
