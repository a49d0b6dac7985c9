"""The server half of secure aggregation as a pure state machine (messages in, messages out).

The transport calls :meth:`SecAggServer.receive` for each client message and :meth:`SecAggServer.close_stage`
when the stage ends (a deadline passed, or :meth:`SecAggServer.all_received`); clients that sent nothing by
then count as dropped. Masked inputs are summed on arrival, so memory stays at one vector whatever n is.

Abort rule (``H(u)`` = u's neighbours and u; for the complete graph every condition reads "fewer than t
clients are left"): when a stage closes with active set A, the round aborts if ``|A| < t`` or

- after key advertisement / key sharing: some active u has ``|A ∩ H(u)| < t`` (u could not share / hold
  enough shares);
- after masked input / the consistency check / unmasking: some survivor u has ``|A' ∩ H(u)| < t`` (its self
  mask could not be removed), or some dropped u whose pairwise masks are in the sum has ``|A' ∩ N(u)| < t``,
  where A' is the set that will reveal shares: after the consistency check, the signers v that t holders
  (v included) vouch for, ``|A ∩ H(v)| >= t`` (the others would refuse to unmask).

Consistency check (Bonawitz et al. 2017, section 4): after the masked inputs, the server announces the one
survivor set U3 to every survivor, each signs it with its identity key, and the server forwards to every
signer its neighbours' signatures; a client reveals shares only when t of its holders signed the set it
signed itself. Signatures are verified here too, so a forged one is refused at once.

All conditions are checked before any secret is reconstructed, so an aborted round reveals nothing.

Verified reconstruction. Every client commits to its self-mask seed in its signed key advertisement
(SHA-256 over a fresh nonce and the seed, :func:`~fedfer.security.secagg._derive.seed_commitment`), and
encrypts each share it deals under its own single-use key. At unmasking a holder does not send the shares it
holds: it sends its own seed share and the keys of the ciphertexts it received, and the server decrypts the
ciphertexts it routed at stage 3 itself. So:

- a key that does not open its ciphertext is the holder's lie (an honest holder checked both of its
  ciphertexts when it received them): the response is refused with :class:`ShareVerificationError` naming
  it, nothing of it is used, and the round goes on without it if enough holders remain;
- shares that do not reconstruct the committed opening (or, for a dropped client, the advertised mask key)
  were dealt that way by their owner: the round aborts with :class:`MisbehaviourError` naming the owner.

Bounded influence. The decoded aggregate must be one that clipped, weighted inputs can produce: the total
weight in ``[m, m * max_weight]`` for m survivors and every coordinate of the mean within ``clip`` plus the
stated error bound; otherwise the round aborts with :class:`InvalidAggregateError` and nothing is revealed to
the caller. A device that stays inside those bounds is not detected (see ``docs/secure-aggregation.md``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from fedfer.security.crypto import aead_decrypt
from fedfer.security.errors import IntegrityError, ProtocolError, RoundAbortedError, ValidationError
from fedfer.security.keys import PUBLIC_KEY_BYTES, AgreementKey, verify_signature
from fedfer.security.quantize import working_dtype
from fedfer.security.secagg._derive import (
    KEY_SHARE,
    OPENING_BYTES,
    SEED_SHARE,
    MaskApplier,
    pairwise_info,
    pairwise_sign,
    reduce_mod,
    seed_commitment,
    seed_of,
    self_mask_key,
    share_ad,
)
from fedfer.security.secagg._wire import MalformedMessageError, Reader, Writer
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
    ShareKeys,
    SharesBroadcast,
    SignedSurvivors,
    UnmaskRequest,
    UnmaskResponse,
    consistency_payload,
    pack_vector,
    signed_keys_payload,
    unpack_vector,
)
from fedfer.security.secagg.params import SecAggParams
from fedfer.security.secagg.stage import Stage
from fedfer.security.shamir import FIELD_PRIME, reconstruct_secret

__all__ = [
    "AggregateResult",
    "DuplicateMessageError",
    "InvalidAggregateError",
    "MisbehaviourError",
    "SecAggServer",
    "ShareVerificationError",
]

_KEY_BYTES = 32
_KIND_SNAPSHOT = 11


class DuplicateMessageError(ProtocolError):
    """A client sent a second message in one stage; the first one stands (a retry can be treated as done)."""


class ShareVerificationError(IntegrityError):
    """A client's unmask response reveals a key that does not open the ciphertext its owner dealt to it.

    Attributes:
        culprit: the client that sent the response.
    """

    def __init__(self, message: str, *, culprit: int) -> None:
        super().__init__(message)
        self.culprit = culprit


class MisbehaviourError(RoundAbortedError):
    """The round aborted because clients dealt shares that do not reconstruct what they committed to.

    Attributes:
        culprits: the clients at fault, increasing.
    """

    def __init__(self, message: str, *, culprits: tuple[int, ...]) -> None:
        super().__init__(message)
        self.culprits = culprits


class InvalidAggregateError(RoundAbortedError):
    """The decoded aggregate is outside what clipped, weighted inputs can sum to; nothing is published."""


_AFTER_MASKED_INPUT = frozenset({Stage.CONSISTENCY_CHECK, Stage.UNMASK})


@dataclass(frozen=True, eq=False)
class AggregateResult:
    """The only thing a round reveals: the weighted sum of the survivors' updates and their total weight.

    Attributes:
        weighted_sum: float64 array, sum over survivors of ``weight * clip(update)`` (fixed-point decoded).
        total_weight: sum of the survivors' weights.
        survivors: ids of the clients whose updates are in the sum.
        error_bound: per-coordinate bound on ``|mean() - exact weighted mean of clipped updates|``.
        flagged: clients whose unmask response failed verification and was refused (the round completed
            without what they revealed).
    """

    weighted_sum: npt.NDArray[np.float64] = field(repr=False)
    total_weight: int
    survivors: tuple[int, ...]
    error_bound: float
    flagged: tuple[int, ...] = ()

    def mean(self) -> npt.NDArray[np.float64]:
        """The FedAvg mean ``weighted_sum / total_weight``."""
        return self.weighted_sum / float(self.total_weight)


class SecAggServer:
    """The server's side of one secure-aggregation round.

    Args:
        params: the round parameters.
        identity_keys: ``{client id: Ed25519 public key bytes}`` for every id 1..n (from the registry);
            advertised round keys must be signed by these.

    Raises:
        ValidationError: on malformed arguments.
    """

    def __init__(self, *, params: SecAggParams, identity_keys: Mapping[int, bytes]) -> None:
        if not isinstance(params, SecAggParams):
            raise ValidationError("params must be SecAggParams")
        roster: dict[int, bytes] = {}
        for cid in range(1, params.num_clients + 1):
            pk = identity_keys.get(cid)
            if type(pk) is not bytes or len(pk) != PUBLIC_KEY_BYTES:
                raise ValidationError("identity_keys must map every id 1..n to 32 public-key bytes")
            roster[cid] = pk
        self._params = params
        self._roster = roster
        self._graph = NeighbourGraph(params)
        self._stage = Stage.ADVERTISE_KEYS
        self._eligible: frozenset[int] = frozenset(roster)
        self._received: set[int] = set()
        self._keys: dict[int, AdvertiseKeys] = {}
        self._share_msgs: dict[int, ShareKeys] = {}
        self._dealt: dict[int, dict[int, EncryptedShare]] = {}  # owner -> receiver -> ciphertexts
        self._own_seed: dict[int, bytes] = {}  # responder -> its share of its own seed opening
        self._opened: dict[int, dict[int, dict[int, bytes]]] = {SEED_SHARE: {}, KEY_SHARE: {}}
        self._flagged: dict[int, str] = {}
        self._sum: npt.NDArray[np.unsignedinteger[Any]] | None = None
        self._signatures: dict[int, ConsistencySignature] = {}
        self._responses: dict[int, UnmaskResponse] = {}
        self._u1: frozenset[int] = frozenset()
        self._u2: frozenset[int] = frozenset()
        self._u3: frozenset[int] = frozenset()
        self._u3_ids: tuple[int, ...] = ()
        self._outgoing: dict[int, Message] = {}
        self._result: AggregateResult | None = None
        self.mask_bytes_generated = 0

    # -- introspection -----------------------------------------------------------------------------------

    @property
    def params(self) -> SecAggParams:
        """The round parameters."""
        return self._params

    @property
    def stage(self) -> Stage:
        """The stage being collected."""
        return self._stage

    @property
    def graph(self) -> NeighbourGraph:
        """The round's neighbour graph."""
        return self._graph

    def eligible(self) -> frozenset[int]:
        """Clients allowed to send in the current stage."""
        return self._eligible

    def received(self) -> frozenset[int]:
        """Clients whose message for the current stage has been accepted."""
        return frozenset(self._received)

    def pending(self) -> frozenset[int]:
        """Eligible clients that have not sent yet in the current stage."""
        return self._eligible - self._received

    def all_received(self) -> bool:
        """True when every eligible client has sent its message for the current stage."""
        return not self.pending()

    def flagged(self) -> dict[int, str]:
        """Clients whose messages failed verification against what they or their peers committed to, with a
        fixed reason each (their messages were refused; this only records who)."""
        return dict(self._flagged)

    def __repr__(self) -> str:
        return (
            f"SecAggServer(num_clients={self._params.num_clients}, stage={self._stage.name}, "
            f"received={len(self._received)})"
        )

    # -- receiving ---------------------------------------------------------------------------------------

    def receive(self, message: Message) -> None:
        """Validate one client message for the current stage and record it.

        A rejected message changes nothing.

        Args:
            message: a client message (parse bytes with
                :func:`~fedfer.security.secagg.messages.decode_message`).

        Raises:
            RoundAbortedError: the round has aborted.
            ProtocolError: wrong stage or type, another round, a sender not eligible in this stage, a
                malformed share routing, or a repeated sender (:class:`DuplicateMessageError`).
            IntegrityError: an advertised key set is not signed by the sender's identity key.
            ShareVerificationError: an unmask response reveals a key that does not open its ciphertext (the
                sender is recorded in :meth:`flagged`).
        """
        if self._stage is Stage.ABORTED:
            raise RoundAbortedError("the round has aborted")
        if self._stage is Stage.FINISHED:
            raise ProtocolError("the round is finished")
        expected = STAGE_MESSAGE[self._stage]
        if type(message) is not expected:
            raise ProtocolError(f"stage {self._stage.name} accepts only {expected.__name__} messages")
        if message.round_id != self._params.round_id:
            raise ProtocolError("message belongs to another round")
        sender = message.sender
        if sender not in self._eligible:
            raise ProtocolError("sender is not a participant of this stage")
        if sender in self._received:
            raise DuplicateMessageError("sender already sent its message for this stage")
        if type(message) is AdvertiseKeys:
            self._receive_keys(message)
        elif type(message) is ShareKeys:
            self._receive_shares(message)
        elif type(message) is MaskedInput:
            self._receive_masked(message)
        elif type(message) is ConsistencySignature:
            self._receive_signature(message)
        elif type(message) is UnmaskResponse:
            self._receive_unmask(message)
        self._received.add(sender)

    def _receive_keys(self, msg: AdvertiseKeys) -> None:
        if msg.encryption_key == msg.mask_key:
            raise IntegrityError("encryption and mask keys must differ")
        verify_signature(
            self._roster[msg.sender],
            signed_keys_payload(
                self._params.digest, msg.sender, msg.encryption_key, msg.mask_key, msg.seed_commitment
            ),
            msg.signature,
        )
        self._keys[msg.sender] = msg

    def _receive_shares(self, msg: ShareKeys) -> None:
        expected = sorted(self._u1 & self._graph.neighbors(msg.sender))
        if [s.receiver for s in msg.shares] != expected:
            raise ProtocolError("shares must go to exactly the sender's neighbours that advertised keys")
        self._share_msgs[msg.sender] = msg
        self._dealt[msg.sender] = {s.receiver: s for s in msg.shares}

    def _receive_masked(self, msg: MaskedInput) -> None:
        if msg.modulus_bits != self._params.modulus_bits:
            raise ProtocolError("masked input uses another modulus")
        if msg.vector.shape != (self._params.vector_length,):
            raise ProtocolError("masked input has the wrong length")
        if self._sum is None:
            self._sum = np.zeros(self._params.vector_length, dtype=working_dtype(self._params.modulus_bits))
        np.add(self._sum, msg.vector, out=self._sum)

    def _receive_signature(self, msg: ConsistencySignature) -> None:
        verify_signature(
            self._roster[msg.sender], consistency_payload(self._params.digest, self._u3_ids), msg.signature
        )
        self._signatures[msg.sender] = msg

    def _receive_unmask(self, msg: UnmaskResponse) -> None:
        v = msg.sender
        want_seed = sorted(self._u3 & self._graph.neighbors(v))
        want_keys = sorted((self._u2 - self._u3) & self._graph.neighbors(v))
        if [s.owner for s in msg.seed_keys] != want_seed or [s.owner for s in msg.key_keys] != want_keys:
            raise ProtocolError("unmask response does not reveal exactly the requested shares")
        if int.from_bytes(msg.own_seed_share, "big") >= FIELD_PRIME:
            raise self._flag(v, "its own seed share is not a field element")
        opened: dict[int, dict[int, bytes]] = {SEED_SHARE: {}, KEY_SHARE: {}}
        for kind, revealed in ((SEED_SHARE, msg.seed_keys), (KEY_SHARE, msg.key_keys)):
            for item in revealed:
                dealt = self._dealt[item.owner][v]
                sealed = dealt.seed_ciphertext if kind == SEED_SHARE else dealt.key_ciphertext
                try:
                    share = aead_decrypt(
                        item.key, sealed, associated_data=share_ad(self._params.digest, item.owner, v, kind)
                    )
                except IntegrityError:
                    raise self._flag(v, "a revealed key does not open the ciphertext it was dealt") from None
                opened[kind][item.owner] = share
        # Verified: only now does the response change state.
        for kind, shares in opened.items():
            for owner, share in shares.items():
                self._opened[kind].setdefault(owner, {})[v] = share
        self._own_seed[v] = msg.own_seed_share
        self._responses[v] = msg

    def _flag(self, client: int, reason: str) -> ShareVerificationError:
        self._flagged[client] = reason
        return ShareVerificationError(f"client {client}: {reason}", culprit=client)

    # -- closing stages ----------------------------------------------------------------------------------

    def _abort(self, reason: str) -> RoundAbortedError:
        self._stage = Stage.ABORTED
        self._sum = None
        self._clear_secrets()
        self._outgoing.clear()
        self._eligible = frozenset()
        self._received.clear()
        return RoundAbortedError(reason)

    def _check_holders(self, active: frozenset[int], owners: frozenset[int], *, include_self: bool) -> bool:
        t = self._params.threshold
        for u in owners:
            holders = self._graph.holders(u) if include_self else self._graph.neighbors(u)
            if len(active & holders) < t:
                return False
        return True

    def close_stage(self) -> dict[int, Message]:
        """End the current stage: clients that did not send count as dropped.

        Returns:
            The next message for each client still in the round (``{}`` after the last stage, when
            :meth:`result` is ready). The same messages stay available through :meth:`message_for`.

        Raises:
            RoundAbortedError: too few clients remain (see the module docstring); nothing is revealed.
            ProtocolError: the round is already finished.
            MisbehaviourError: some clients dealt shares that do not reconstruct what they committed to; the
                round is aborted and the error names them.
            InvalidAggregateError: the decoded aggregate is outside what clipped, weighted inputs can sum to;
                the round is aborted.
        """
        if self._stage is Stage.ABORTED:
            raise RoundAbortedError("the round has aborted")
        if self._stage is Stage.FINISHED:
            raise ProtocolError("the round is finished")
        active = frozenset(self._received)
        t = self._params.threshold
        if len(active) < t:
            raise self._abort("fewer clients than the threshold remain")
        if self._stage is Stage.ADVERTISE_KEYS:
            if not self._check_holders(active, active, include_self=True):
                raise self._abort("a client has fewer than t neighbours with keys")
            self._u1 = active
            self._outgoing = {
                u: KeysBroadcast(
                    self._params.round_id,
                    u,
                    tuple(self._keys[v] for v in sorted(active & self._graph.holders(u))),
                )
                for u in sorted(active)
            }
            self._next(Stage.SHARE_KEYS, active)
        elif self._stage is Stage.SHARE_KEYS:
            if not self._check_holders(active, active, include_self=True):
                raise self._abort("a client has fewer than t neighbours holding its shares")
            self._u2 = active
            inbox: dict[int, list[EncryptedShare]] = {u: [] for u in active}
            for u in sorted(active):
                for share in self._share_msgs[u].shares:
                    if share.receiver in inbox:
                        inbox[share.receiver].append(share)
            self._outgoing = {
                v: SharesBroadcast(self._params.round_id, v, tuple(items))
                for v, items in sorted(inbox.items())
            }
            self._next(Stage.MASKED_INPUT, active)
        elif self._stage is Stage.MASKED_INPUT:
            if not self._masks_removable(active):
                raise self._abort("too few survivors to remove every mask")
            self._u3 = active
            self._u3_ids = tuple(sorted(active))
            self._outgoing = {
                v: ConsistencyRequest(self._params.round_id, v, self._u3_ids) for v in self._u3_ids
            }
            self._next(Stage.CONSISTENCY_CHECK, active)
        elif self._stage is Stage.CONSISTENCY_CHECK:
            vouched = frozenset(v for v in active if len(active & self._graph.holders(v)) >= t)
            if len(vouched) < t or not self._masks_removable(vouched):
                raise self._abort("too few survivors vouch for the survivor set to remove every mask")
            dropped = self._u2 - self._u3
            self._outgoing = {
                v: UnmaskRequest(
                    self._params.round_id,
                    v,
                    tuple(sorted(self._u3 & self._graph.holders(v))),
                    tuple(sorted(dropped & self._graph.neighbors(v))),
                    tuple(
                        SignedSurvivors(u, self._signatures[u].signature)
                        for u in sorted(active & self._graph.neighbors(v))
                    ),
                )
                for v in sorted(vouched)
            }
            self._next(Stage.UNMASK, vouched)
        else:
            if not self._masks_removable(active):
                raise self._abort("too few clients revealed shares to remove every mask")
            try:
                self._result = self._unmask(active)
            except (MisbehaviourError, InvalidAggregateError) as exc:
                self._abort(str(exc))
                raise
            except (IntegrityError, ValidationError) as exc:
                raise self._abort("reconstruction failed") from exc
            self._outgoing = {}
            self._next(Stage.FINISHED, frozenset())
        return dict(self._outgoing)

    def _masks_removable(self, active: frozenset[int]) -> bool:
        survivors = self._u3 if self._stage in _AFTER_MASKED_INPUT else active
        dropped = self._u2 - survivors
        dropped_in_sum = frozenset(u for u in dropped if survivors & self._graph.neighbors(u))
        return self._check_holders(active, survivors, include_self=True) and self._check_holders(
            active, dropped_in_sum, include_self=False
        )

    def _next(self, stage: Stage, eligible: frozenset[int]) -> None:
        self._stage = stage
        self._eligible = eligible
        self._received = set()

    def _clear_secrets(self) -> None:
        self._responses.clear()
        self._signatures.clear()
        self._share_msgs.clear()
        self._dealt.clear()
        self._own_seed.clear()
        for opened in self._opened.values():
            opened.clear()

    def _reconstruct(self, owner: int, kind: int, length: int) -> bytes | None:
        """The owner's secret from the first t verified shares (those it dealt first, then its own), or None
        if they do not interpolate to a secret of ``length`` bytes (the owner dealt them that way)."""
        shares = dict(self._opened[kind].get(owner, {}))
        own = self._own_seed.get(owner) if kind == SEED_SHARE else None
        if len(shares) < self._params.threshold and own is not None:
            shares[owner] = own
        try:
            return reconstruct_secret(shares, threshold=self._params.threshold, secret_len=length)
        except IntegrityError:
            return None

    def _unmask(self, responders: frozenset[int]) -> AggregateResult:
        params = self._params
        digest = params.digest
        total = self._sum
        if total is None:  # pragma: no cover - U3 >= t >= 2 guarantees at least one masked input
            raise ProtocolError("no masked input")
        openings: dict[int, bytes] = {}
        keys: dict[int, AgreementKey] = {}
        culprits: list[int] = []
        for u in sorted(self._u3):
            opening = self._reconstruct(u, SEED_SHARE, OPENING_BYTES)
            if opening is None or seed_commitment(digest, u, opening) != self._keys[u].seed_commitment:
                culprits.append(u)
            else:
                openings[u] = opening
        for u in sorted(self._u2 - self._u3):
            if not self._u3 & self._graph.neighbors(u):
                continue
            raw = self._reconstruct(u, KEY_SHARE, _KEY_BYTES)
            key = None if raw is None else AgreementKey.dangerously_import_private_bytes(raw)
            if key is None or key.public_bytes() != self._keys[u].mask_key:
                culprits.append(u)
            else:
                keys[u] = key
        if culprits:
            raise MisbehaviourError(
                f"shares dealt by clients {sorted(culprits)} do not reconstruct what they committed to",
                culprits=tuple(sorted(culprits)),
            )
        applier = MaskApplier(length=params.vector_length, dtype=working_dtype(params.modulus_bits))
        for opening in openings.values():
            applier.apply(total, self_mask_key(seed_of(opening), digest), -1)
        for u, key in keys.items():
            for v in sorted(self._u3 & self._graph.neighbors(u)):
                seed = key.derive(self._keys[v].mask_key, info=pairwise_info(u, v), salt=digest)
                applier.apply(total, seed, -pairwise_sign(v, u))
        self.mask_bytes_generated += applier.generated_bytes
        codec = params.codec()
        weighted_sum, total_weight = codec.decode_sum(total)
        survivors = tuple(sorted(self._u3))
        m = len(survivors)
        if not m <= total_weight <= m * params.max_weight:
            raise InvalidAggregateError(
                "decoded total weight is outside survivors..survivors x max_weight: an input was not a "
                "clipped, weighted update"
            )
        bound = codec.mean_error_bound(survivors=m, total_weight=total_weight)
        outside = int(np.count_nonzero(np.abs(weighted_sum / float(total_weight)) > params.clip + bound))
        if outside:
            raise InvalidAggregateError(
                f"{outside} of {params.dim} decoded mean coordinates exceed clip plus the error bound: an "
                "input was not a clipped, weighted update"
            )
        self._sum = None
        self._clear_secrets()
        return AggregateResult(weighted_sum, total_weight, survivors, bound, tuple(sorted(self._flagged)))

    # -- outputs -----------------------------------------------------------------------------------------

    def message_for(self, client_id: int) -> Message:
        """The message the last closed stage produced for ``client_id`` (safe to fetch again on retry).

        Raises:
            ProtocolError: no such message (the client dropped, or no stage has closed yet).
        """
        msg = self._outgoing.get(client_id)
        if msg is None:
            raise ProtocolError("no message for this client in the current stage")
        return msg

    def result(self) -> AggregateResult:
        """The aggregate, once the unmask stage has closed.

        Raises:
            RoundAbortedError: the round aborted.
            ProtocolError: the round has not finished.
        """
        if self._stage is Stage.ABORTED:
            raise RoundAbortedError("the round has aborted")
        if self._result is None:
            raise ProtocolError("the round has not finished")
        return self._result

    # -- persistence -------------------------------------------------------------------------------------

    def snapshot(self) -> bytes:
        """Serialize the whole round state (canonical, versioned bytes) for persistence across restarts.

        The state holds only what the server may see (signed public keys, the ciphertexts it routes, the
        *masked* running sum, revealed shares), but store it encrypted at rest anyway.

        Returns:
            Bytes for :meth:`restore`.

        Raises:
            ProtocolError: the round is finished (persist :meth:`result` instead).
        """
        if self._stage is Stage.FINISHED:
            raise ProtocolError("the round is finished; persist its result instead")
        w = Writer(_KIND_SNAPSHOT)
        w.blob(self._params.to_bytes())
        w.u8(self._stage.order)
        if self._stage is Stage.ABORTED:
            return w.finish()
        self._write_msgs(w, [self._keys[u] for u in sorted(self._keys)])
        w.u32(len(self._u1))
        self._write_msgs(w, [self._share_msgs[u] for u in sorted(self._share_msgs)])
        masked_ids = sorted(self._received) if self._stage is Stage.MASKED_INPUT else sorted(self._u3)
        w.u32(len(masked_ids))
        for u in masked_ids:
            w.u32(u)
        if self._sum is not None:
            w.u8(1)
            reduce_mod(self._sum, self._params.modulus_bits)
            w.blob(pack_vector(self._sum, self._params.modulus_bits))
        else:
            w.u8(0)
        self._write_msgs(w, [self._signatures[u] for u in sorted(self._signatures)])
        self._write_msgs(w, [self._responses[u] for u in sorted(self._responses)])
        return w.finish()

    @staticmethod
    def _write_msgs(w: Writer, msgs: list[Any]) -> None:
        w.u32(len(msgs))
        for m in msgs:
            w.blob(m.to_bytes())

    @classmethod
    def restore(cls, data: bytes, *, identity_keys: Mapping[int, bytes]) -> SecAggServer:
        """Rebuild a server from :meth:`snapshot` output by replaying its recorded messages.

        Every replayed message is validated again (signatures included), so a corrupted snapshot fails
        loudly instead of producing a wrong aggregate.

        Args:
            data: snapshot bytes.
            identity_keys: the roster's identity public keys (as for the constructor).

        Returns:
            A server in the same stage with the same state.

        Raises:
            MalformedMessageError: on a malformed snapshot.
            IntegrityError: on a replayed message that fails verification.
        """
        r = Reader(data, _KIND_SNAPSHOT)
        params = SecAggParams.from_bytes(r.blob())
        stage = Stage.from_order(r.u8())
        if stage is None or stage.order < Stage.ADVERTISE_KEYS.order:
            raise MalformedMessageError("unknown stage in snapshot")
        server = cls(params=params, identity_keys=identity_keys)
        if stage is Stage.ABORTED:
            r.end()
            server._abort("restored an aborted round")
            return server
        keys = [AdvertiseKeys.from_bytes(r.blob()) for _ in range(r.count())]
        n_u1 = r.u32()
        shares = [ShareKeys.from_bytes(r.blob()) for _ in range(r.count())]
        masked_ids = frozenset(r.u32() for _ in range(r.count()))
        packed_sum = r.blob() if r.u8() == 1 else None
        signatures = [ConsistencySignature.from_bytes(r.blob()) for _ in range(r.count())]
        responses = [UnmaskResponse.from_bytes(r.blob()) for _ in range(r.count())]
        r.end()
        for m in keys:
            server.receive(m)
        if stage.order > Stage.ADVERTISE_KEYS.order:
            server.close_stage()
            if len(server._u1) != n_u1:
                raise MalformedMessageError("snapshot is inconsistent")
            for s in shares:
                server.receive(s)
        if stage.order > Stage.SHARE_KEYS.order:
            server.close_stage()
            if not masked_ids <= server._eligible:
                raise MalformedMessageError("snapshot is inconsistent")
            if packed_sum is not None:
                vec = unpack_vector(packed_sum, params.modulus_bits)
                if vec.shape != (params.vector_length,):
                    raise MalformedMessageError("snapshot is inconsistent")
                server._sum = vec.astype(working_dtype(params.modulus_bits), copy=True)
            server._received = set(masked_ids)
        if stage.order > Stage.MASKED_INPUT.order:
            server.close_stage()
            for sig in signatures:
                server.receive(sig)
        if stage.order > Stage.CONSISTENCY_CHECK.order:
            server.close_stage()
            for resp in responses:
                server.receive(resp)
        if server._stage is not stage:
            raise MalformedMessageError("snapshot is inconsistent")
        return server
