"""The client half of secure aggregation as a pure state machine (messages in, messages out).

No sockets, clocks, files or threads: the transport feeds each server message to the matching method and
sends back what it returns. Every incoming message is checked for exact type, stage, round and addressee
before it touches state; any failure moves the client to ``ABORTED`` and drops its secrets, so a confused or
malicious server can at worst make the client stop, never make it reveal more.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, NoReturn

import numpy as np
import numpy.typing as npt

from fedfer.security.crypto import RandomBytes, aead_decrypt, aead_encrypt
from fedfer.security.errors import IntegrityError, ProtocolError, RoundAbortedError, ValidationError
from fedfer.security.keys import PUBLIC_KEY_BYTES, AgreementKey, IdentityKey, verify_signature
from fedfer.security.quantize import working_dtype
from fedfer.security.secagg._derive import (
    KEY_SHARE,
    OPENING_BYTES,
    SEED_SHARE,
    MaskApplier,
    encryption_info,
    pairwise_info,
    pairwise_sign,
    reduce_mod,
    seed_commitment,
    seed_of,
    self_mask_key,
    share_ad,
    share_keys,
)
from fedfer.security.secagg.graph import NeighbourGraph
from fedfer.security.secagg.messages import (
    AdvertiseKeys,
    ConsistencyRequest,
    ConsistencySignature,
    EncryptedShare,
    KeysBroadcast,
    MaskedInput,
    RevealedKey,
    ShareKeys,
    SharesBroadcast,
    UnmaskRequest,
    UnmaskResponse,
    consistency_payload,
    signed_keys_payload,
)
from fedfer.security.secagg.params import SecAggParams
from fedfer.security.secagg.stage import Stage
from fedfer.security.shamir import split_secret

__all__ = ["SecAggClient"]


class SecAggClient:
    """One client's side of one secure-aggregation round.

    Args:
        params: the round parameters (identical on every party).
        client_id: this client's id in the round, 1..n.
        identity_key: this device's Ed25519 identity key handle.
        identity_keys: ``{client id: Ed25519 public key bytes}`` for the round's roster, delivered by the
            transport from device certificates / the registry (must contain at least this client and its
            neighbours). Peer round keys are trusted only if signed by these keys.
        _random_bytes: private test seam for all randomness; production uses the OS CSPRNG.

    Raises:
        ValidationError: on malformed arguments or an identity key that does not match the roster.
    """

    def __init__(
        self,
        *,
        params: SecAggParams,
        client_id: int,
        identity_key: IdentityKey,
        identity_keys: Mapping[int, bytes],
        _random_bytes: RandomBytes = os.urandom,
    ) -> None:
        if not isinstance(params, SecAggParams):
            raise ValidationError("params must be SecAggParams")
        if type(client_id) is not int or not 1 <= client_id <= params.num_clients:
            raise ValidationError("client_id must be an int in 1..num_clients")
        if not isinstance(identity_key, IdentityKey):
            raise ValidationError("identity_key must be an IdentityKey handle")
        graph = NeighbourGraph(params)
        holders = graph.holders(client_id)
        roster: dict[int, bytes] = {}
        for cid in holders:
            pk = identity_keys.get(cid)
            if type(pk) is not bytes or len(pk) != PUBLIC_KEY_BYTES:
                raise ValidationError("identity_keys must map every neighbour id to 32 public-key bytes")
            roster[cid] = pk
        if roster[client_id] != identity_key.public_bytes():
            raise ValidationError("identity_key does not match this client's roster entry")
        self._params = params
        self._id = client_id
        self._identity = identity_key
        self._roster = roster
        self._neighbors = graph.neighbors(client_id)
        self._random = _random_bytes
        self._stage = Stage.ADVERTISE_KEYS
        self._enc_key: AgreementKey | None = None
        self._mask_key: AgreementKey | None = None
        self._advertised: AdvertiseKeys | None = None
        self._peer_keys: dict[int, AdvertiseKeys] = {}
        self._pair_secrets: dict[int, bytes] = {}
        self._opening: bytes | None = None  # nonce || self-mask seed, committed to in the advertisement
        self._own_shares: tuple[bytes, bytes] | None = None  # this client's share of each of its secrets
        self._held: dict[int, tuple[bytes, bytes]] = {}  # per neighbour: keys opening its two ciphertexts
        self._share_peers: frozenset[int] = frozenset()
        self._signed_survivors: tuple[int, ...] | None = None
        self.mask_bytes_generated = 0

    @property
    def client_id(self) -> int:
        """This client's id in the round."""
        return self._id

    @property
    def stage(self) -> Stage:
        """The stage the client is in."""
        return self._stage

    def __repr__(self) -> str:
        return f"SecAggClient(client_id={self._id}, stage={self._stage.key})"

    def __reduce__(self) -> NoReturn:
        # The client holds key handles and other clients' shares: never serialize it.
        raise TypeError("SecAggClient holds secrets and cannot be pickled")

    def __deepcopy__(self, memo: Any) -> NoReturn:
        raise TypeError("SecAggClient holds secrets and cannot be copied")

    # -- helpers -----------------------------------------------------------------------------------------

    def _expect(self, stage: Stage, message: object, message_type: type, addressee: object) -> None:
        """Cheap checks that reject a message without changing any state."""
        if self._stage is Stage.ABORTED:
            raise RoundAbortedError("this client has aborted the round")
        if self._stage is not stage:
            raise ProtocolError(f"client is in stage {self._stage.key}, not {stage.key}")
        if type(message) is not message_type:
            raise ProtocolError(f"expected a {message_type.__name__} message")
        if getattr(message, "round_id", None) != self._params.round_id:
            raise ProtocolError("message belongs to another round")
        if addressee != self._id:
            raise ProtocolError("message is addressed to another client")

    def _abort(self) -> None:
        self._stage = Stage.ABORTED
        self._wipe()

    def _check_quorum(self, request: UnmaskRequest, signed: tuple[int, ...]) -> None:
        """Require t holders (this one included) to have signed ``signed``; verify only as many as needed."""
        t = self._params.threshold
        payload = consistency_payload(self._params.digest, signed)
        in_sum = set(signed)
        vouching = 1
        for item in request.signatures:
            if vouching >= t:
                break
            if item.signer not in self._neighbors or item.signer not in in_sum:
                raise ProtocolError("a consistency signature from a client that is not a surviving neighbour")
            verify_signature(self._roster[item.signer], payload, item.signature)
            vouching += 1
        if vouching < t:
            raise RoundAbortedError("fewer than t share holders vouch for the survivor set")

    def _wipe(self) -> None:
        self._enc_key = None
        self._mask_key = None
        self._opening = None
        self._own_shares = None
        self._pair_secrets.clear()
        self._held.clear()
        self._signed_survivors = None

    def _guarded(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (ProtocolError, IntegrityError, RoundAbortedError, ValidationError):
            if self._stage is not Stage.ABORTED:
                self._abort()
            raise

    # -- stage 1 -----------------------------------------------------------------------------------------

    def advertise_keys(self) -> AdvertiseKeys:
        """Generate the round's two X25519 key pairs and the self-mask seed; return the public keys and a
        commitment to the seed (with a fresh nonce), signed.

        Returns:
            The :class:`AdvertiseKeys` message for the server.

        Raises:
            ProtocolError: if called out of order.
        """
        if self._stage is not Stage.ADVERTISE_KEYS:
            raise ProtocolError(f"client is in stage {self._stage.key}, not advertise_keys")
        self._enc_key = AgreementKey.generate(_random_bytes=self._random)
        self._mask_key = AgreementKey.generate(_random_bytes=self._random)
        opening = self._random(OPENING_BYTES)
        if type(opening) is not bytes or len(opening) != OPENING_BYTES:
            raise ValidationError("random source returned malformed bytes")
        self._opening = opening
        enc_pk = self._enc_key.public_bytes()
        mask_pk = self._mask_key.public_bytes()
        digest = self._params.digest
        commitment = seed_commitment(digest, self._id, opening)
        signature = self._identity.sign(signed_keys_payload(digest, self._id, enc_pk, mask_pk, commitment))
        self._advertised = AdvertiseKeys(
            self._params.round_id, self._id, enc_pk, mask_pk, commitment, signature
        )
        self._stage = Stage.SHARE_KEYS
        return self._advertised

    # -- stage 2 -----------------------------------------------------------------------------------------

    def share_keys(self, broadcast: KeysBroadcast) -> ShareKeys:
        """Verify the neighbours' signed keys, then secret-share this client's seed and mask key to them.

        Args:
            broadcast: the server's :class:`KeysBroadcast` for this client.

        Returns:
            The :class:`ShareKeys` message (one AEAD ciphertext per neighbour).

        Raises:
            ProtocolError: wrong stage, type, round, addressee, or entries from non-neighbours.
            IntegrityError: a neighbour's keys are not signed by its identity key, or keys were altered.
            RoundAbortedError: fewer than t share holders advertised keys.
        """
        self._expect(Stage.SHARE_KEYS, broadcast, KeysBroadcast, getattr(broadcast, "receiver", None))
        return self._guarded(self._share_keys, broadcast)  # type: ignore[no-any-return]

    def _share_keys(self, broadcast: KeysBroadcast) -> ShareKeys:
        if (
            self._enc_key is None
            or self._mask_key is None
            or self._advertised is None
            or self._opening is None
        ):
            raise ProtocolError("client state is incomplete")  # unreachable: the stage guarantees it
        entries = {e.sender: e for e in broadcast.entries}
        if entries.get(self._id) != self._advertised:
            raise IntegrityError("own advertised keys are missing or altered")
        seen_keys: set[bytes] = set()
        for sender, entry in entries.items():
            if sender != self._id and sender not in self._neighbors:
                raise ProtocolError("keys from a client that is not a neighbour")
            if entry.encryption_key in seen_keys or entry.mask_key in seen_keys:
                raise IntegrityError("duplicate public keys in broadcast")
            seen_keys.update((entry.encryption_key, entry.mask_key))
        if len(entries) < self._params.threshold:
            raise RoundAbortedError("fewer share holders than the threshold")
        digest = self._params.digest
        for sender, entry in entries.items():
            if sender != self._id:
                verify_signature(
                    self._roster[sender],
                    signed_keys_payload(
                        digest, sender, entry.encryption_key, entry.mask_key, entry.seed_commitment
                    ),
                    entry.signature,
                )
        self._peer_keys = {s: e for s, e in entries.items() if s != self._id}
        points = sorted(entries)
        t = self._params.threshold
        seed_shares = split_secret(self._opening, threshold=t, points=points, _random_bytes=self._random)
        key_shares = split_secret(
            self._mask_key.dangerously_export_private_bytes(),
            threshold=t,
            points=points,
            _random_bytes=self._random,
        )
        out: list[EncryptedShare] = []
        for peer in points:
            if peer == self._id:
                self._own_shares = (seed_shares[peer], key_shares[peer])
                continue
            pair = self._enc_key.derive(
                self._peer_keys[peer].encryption_key, info=encryption_info(self._id, peer), salt=digest
            )
            self._pair_secrets[peer] = pair
            seed_key, mask_key = share_keys(pair, digest, sender=self._id, receiver=peer)
            sealed = [
                aead_encrypt(
                    key,
                    share,
                    associated_data=share_ad(digest, self._id, peer, kind),
                    _random_bytes=self._random,
                )
                for key, share, kind in (
                    (seed_key, seed_shares[peer], SEED_SHARE),
                    (mask_key, key_shares[peer], KEY_SHARE),
                )
            ]
            out.append(EncryptedShare(self._id, peer, sealed[0], sealed[1]))
        self._enc_key = None  # only the agreed per-peer secrets are needed from here on
        self._stage = Stage.MASKED_INPUT
        return ShareKeys(self._params.round_id, self._id, tuple(out))

    # -- stage 3 -----------------------------------------------------------------------------------------

    def masked_input(
        self, broadcast: SharesBroadcast, *, update: npt.NDArray[np.floating[Any]], weight: int
    ) -> MaskedInput:
        """Store the shares received from neighbours and return the masked, weighted, quantized update.

        Args:
            broadcast: the server's :class:`SharesBroadcast` for this client.
            update: 1-D float array of length ``params.dim`` (clipped to ``[-clip, clip]``).
            weight: integer weight 1..max_weight (for FedAvg, the example count).

        Returns:
            The :class:`MaskedInput` message.

        Raises:
            ProtocolError: wrong stage, type, round, addressee, or shares from non-neighbours.
            IntegrityError: a share fails authenticated decryption (tampered, misaddressed, replayed).
            RoundAbortedError: fewer than t share holders (this client included) remain.
            ValidationError: on a malformed update or weight.
        """
        self._expect(Stage.MASKED_INPUT, broadcast, SharesBroadcast, getattr(broadcast, "receiver", None))
        encoded = self._params.codec().encode(update, weight)  # a bad local input does not abort the round
        return self._guarded(self._masked_input, broadcast, encoded)  # type: ignore[no-any-return]

    def _masked_input(
        self, broadcast: SharesBroadcast, encoded: npt.NDArray[np.unsignedinteger[Any]]
    ) -> MaskedInput:
        if self._mask_key is None or self._opening is None:
            raise ProtocolError("client state is incomplete")  # unreachable: the stage guarantees it
        params = self._params
        senders = [s.sender for s in broadcast.shares]
        for sender in senders:
            if sender not in self._peer_keys:
                raise ProtocolError("share from a client that is not an advertised neighbour")
        if len(senders) + 1 < params.threshold:
            raise RoundAbortedError("fewer share holders than the threshold")
        digest = params.digest
        received: dict[int, tuple[bytes, bytes]] = {}
        for item in broadcast.shares:
            keys = share_keys(self._pair_secrets[item.sender], digest, sender=item.sender, receiver=self._id)
            # Both shares must open now: the keys this client later reveals must open exactly these
            # ciphertexts, which the server keeps, so an honest holder is never blamed for a bad dealer.
            for key, ciphertext, kind in (
                (keys[0], item.seed_ciphertext, SEED_SHARE),
                (keys[1], item.key_ciphertext, KEY_SHARE),
            ):
                aead_decrypt(key, ciphertext, associated_data=share_ad(digest, item.sender, self._id, kind))
            received[item.sender] = keys
        self._held.update(received)
        self._share_peers = frozenset(received)
        applier = MaskApplier(length=params.vector_length, dtype=working_dtype(params.modulus_bits))
        applier.apply(encoded, self_mask_key(seed_of(self._opening), digest), +1)
        for peer in sorted(self._share_peers):
            seed = self._mask_key.derive(
                self._peer_keys[peer].mask_key, info=pairwise_info(self._id, peer), salt=digest
            )
            applier.apply(encoded, seed, pairwise_sign(self._id, peer))
        self.mask_bytes_generated += applier.generated_bytes
        reduce_mod(encoded, params.modulus_bits)
        # The mask key and seed now live on only as shares; drop the originals.
        self._mask_key = None
        self._opening = None
        self._pair_secrets.clear()
        self._stage = Stage.CONSISTENCY_CHECK
        return MaskedInput(params.round_id, self._id, params.modulus_bits, encoded)

    # -- stage 4: consistency check ----------------------------------------------------------------------

    def consistency_check(self, request: ConsistencyRequest) -> ConsistencySignature:
        """Sign the survivor set U3 the server announced (once per round: the client never signs another).

        Bonawitz et al.'s consistency check: before revealing any share the client will require ``t`` of its
        share holders (itself included) to have signed the very same U3, so an honest client reveals shares
        only for a survivor set that enough of its holders saw too.

        Args:
            request: the server's :class:`ConsistencyRequest` for this client.

        Returns:
            The :class:`ConsistencySignature` message.

        Raises:
            ProtocolError: wrong stage, type, round, addressee; this client missing from U3; or U3 naming a
                neighbour that never shared keys with this client.
            RoundAbortedError: fewer than t of this client's holders are in U3.
        """
        self._expect(Stage.CONSISTENCY_CHECK, request, ConsistencyRequest, getattr(request, "receiver", None))
        return self._guarded(self._consistency_check, request)  # type: ignore[no-any-return]

    def _consistency_check(self, request: ConsistencyRequest) -> ConsistencySignature:
        survivors = request.survivors
        if survivors[-1:] and survivors[-1] > self._params.num_clients:
            raise ProtocolError("survivor set names a client outside the round")
        mine = set(survivors) & (self._neighbors | {self._id})
        if self._id not in mine:
            raise ProtocolError("this client is not in the survivor set")
        if not mine - {self._id} <= self._share_peers:
            raise ProtocolError("survivor set names a neighbour that shared no keys with this client")
        if len(mine) < self._params.threshold:
            raise RoundAbortedError("fewer surviving share holders than the threshold")
        signature = self._identity.sign(consistency_payload(self._params.digest, survivors))
        self._signed_survivors = survivors
        self._stage = Stage.UNMASK
        return ConsistencySignature(self._params.round_id, self._id, signature)

    # -- stage 5 -----------------------------------------------------------------------------------------

    def unmask(self, request: UnmaskRequest) -> UnmaskResponse:
        """Reveal this client's own seed share and the keys that open the seed-share ciphertexts of the
        surviving neighbours and the mask-key-share ciphertexts of the dropped ones.

        Never reveals both kinds for one client: the request must classify every neighbour that shared
        keys exactly as the survivor set this client signed does, and carry valid consistency-check
        signatures over that set from at least t - 1 of this client's neighbours (t with its own).

        Args:
            request: the server's :class:`UnmaskRequest` for this client.

        Returns:
            The :class:`UnmaskResponse` message.

        Raises:
            ProtocolError: wrong stage, type, round, addressee, or a survivor/dropped split other than the
                signed set's.
            IntegrityError: a forwarded signature is not valid for the signed set.
            RoundAbortedError: fewer than t holders vouch for the signed set.
        """
        self._expect(Stage.UNMASK, request, UnmaskRequest, getattr(request, "receiver", None))
        return self._guarded(self._unmask, request)  # type: ignore[no-any-return]

    def _unmask(self, request: UnmaskRequest) -> UnmaskResponse:
        signed = self._signed_survivors
        if signed is None:
            raise ProtocolError("client state is incomplete")  # unreachable: the stage guarantees it
        in_sum = set(signed)
        survivors = set(request.survivors)
        dropped = set(request.dropped)
        if survivors != (in_sum & (self._share_peers | {self._id})) or dropped != self._share_peers - in_sum:
            raise ProtocolError("survivor/dropped lists do not match the signed survivor set")
        self._check_quorum(request, signed)
        if self._own_shares is None:
            raise ProtocolError("client state is incomplete")  # unreachable: the stage guarantees it
        seed_keys = tuple(RevealedKey(u, self._held[u][0]) for u in sorted(survivors - {self._id}))
        key_keys = tuple(RevealedKey(u, self._held[u][1]) for u in sorted(dropped))
        own = self._own_shares[0]
        self._wipe()
        self._stage = Stage.FINISHED
        return UnmaskResponse(self._params.round_id, self._id, own, seed_keys, key_keys)
