"""Secure-aggregation messages: frozen dataclasses with exact field types and one canonical encoding each.

Flow (server S, clients 1..n, ``H(u)`` = u's neighbours and u itself):

1. client -> S :class:`AdvertiseKeys` (two X25519 public keys and a commitment to its self-mask seed, signed
   by the device identity key)
2. S -> client :class:`KeysBroadcast` (the signed keys of the client's surviving neighbours)
3. client -> S :class:`ShareKeys` (one :class:`EncryptedShare` per neighbour: Shamir shares of its self-mask
   seed opening and of its mask private key, each AEAD-encrypted under its own single-use key)
4. S -> client :class:`SharesBroadcast` (the encrypted shares addressed to that client)
5. client -> S :class:`MaskedInput` (the quantized, weighted update plus self mask plus pairwise masks)
6. S -> client :class:`ConsistencyRequest` (the set U3 of clients whose masked input is in the sum)
7. client -> S :class:`ConsistencySignature` (the client's identity-key signature over exactly that set)
8. S -> client :class:`UnmaskRequest` (which neighbours survived, which dropped, and the neighbours'
   signatures over the same set)
9. client -> S :class:`UnmaskResponse` (its own seed share, and the single-use keys that open the seed-share
   ciphertexts of the other survivors and the mask-key-share ciphertexts of the dropped: the server decrypts
   the ciphertexts it routed at stage 3, so a share holder cannot substitute a share)

Constructing a message validates every field's exact type and range (``bool`` is not an ``int``) and
raises :class:`MalformedMessageError` otherwise. Sequences are tuples strictly increasing by client id, so
duplicates are impossible and the encoding is canonical. ``to_bytes()``/``from_bytes()`` round-trip exactly;
:func:`decode_message` parses any of them. Big vectors are packed to ``ceil(modulus_bits / 8)`` bytes per
element (4 for the default 32 bits).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeAlias

import numpy as np
import numpy.typing as npt

from fedfer.security.crypto import sha256
from fedfer.security.keys import PUBLIC_KEY_BYTES, SIGNATURE_BYTES
from fedfer.security.quantize import working_dtype
from fedfer.security.secagg._wire import MAX_ITEMS, MalformedMessageError, Reader, Writer, peek_kind
from fedfer.security.secagg.params import MAX_CLIENTS
from fedfer.security.secagg.stage import Stage
from fedfer.security.shamir import SHARE_BYTES

__all__ = [
    "COMMITMENT_BYTES",
    "SHARE_CIPHERTEXT_BYTES",
    "SHARE_KEY_BYTES",
    "SHARE_PLAINTEXT_BYTES",
    "STAGE_MESSAGE",
    "AdvertiseKeys",
    "ClientMessage",
    "ConsistencyRequest",
    "ConsistencySignature",
    "EncryptedShare",
    "KeysBroadcast",
    "MalformedMessageError",
    "MaskedInput",
    "Message",
    "RevealedKey",
    "ShareKeys",
    "SharesBroadcast",
    "SignedSurvivors",
    "UnmaskRequest",
    "UnmaskResponse",
    "consistency_payload",
    "decode_message",
    "signed_keys_payload",
]

SHARE_PLAINTEXT_BYTES = SHARE_BYTES
SHARE_CIPHERTEXT_BYTES = 12 + SHARE_PLAINTEXT_BYTES + 16
SHARE_KEY_BYTES = 32
COMMITMENT_BYTES = 32
_ROUND_ID_MIN = 16
_ROUND_ID_MAX = 64
_SIGN_LABEL = b"fedfer/secagg/v2/advertise-keys"
_CONSISTENCY_LABEL = b"fedfer/secagg/v1/consistency-check"
# Fixed-size records of repeated items (packed and parsed in C, not item by item in Python).
_KEY_RECORD = struct.Struct(f"<I{PUBLIC_KEY_BYTES}s{PUBLIC_KEY_BYTES}s{COMMITMENT_BYTES}s{SIGNATURE_BYTES}s")
_SHARE_RECORD = struct.Struct(f"<II{SHARE_CIPHERTEXT_BYTES}s{SHARE_CIPHERTEXT_BYTES}s")
_REVEALED_RECORD = struct.Struct(f"<I{SHARE_KEY_BYTES}s")
_ID_RECORD = struct.Struct("<I")
_SIGNED_RECORD = struct.Struct(f"<I{SIGNATURE_BYTES}s")


def _round_id(value: object) -> None:
    if type(value) is not bytes or not _ROUND_ID_MIN <= len(value) <= _ROUND_ID_MAX:
        raise MalformedMessageError("round_id must be 16..64 bytes")


def _client_id(name: str, value: object) -> None:
    if type(value) is not int or not 1 <= value <= MAX_CLIENTS:
        raise MalformedMessageError(f"{name} must be an int client id")


def _fixed_bytes(name: str, value: object, size: int) -> None:
    if type(value) is not bytes or len(value) != size:
        raise MalformedMessageError(f"{name} must be {size} bytes")


def _increasing(name: str, items: object, item_type: type, key: Callable[[Any], int]) -> None:
    if type(items) is not tuple:
        raise MalformedMessageError(f"{name} must be a tuple")
    if len(items) > MAX_ITEMS:
        raise MalformedMessageError(f"{name} is too long")
    last = 0
    for item in items:
        if type(item) is not item_type:
            raise MalformedMessageError(f"{name} must hold {item_type.__name__} items")
        k = key(item)
        if k <= last:
            raise MalformedMessageError(f"{name} must be strictly increasing by client id")
        last = k
    return None


def signed_keys_payload(
    params_digest: bytes, sender: int, encryption_key: bytes, mask_key: bytes, seed_commitment: bytes
) -> bytes:
    """The exact bytes a client signs with its identity key when it advertises its round keys.

    Binds the keys and the seed commitment to the round parameters (digest includes the round id) and the
    sender id, so they cannot be replayed into another round or attributed to another client, and the seed the
    server later reconstructs can be checked against what the client itself committed to.
    """
    ids = sender.to_bytes(4, "little")
    return _SIGN_LABEL + params_digest + ids + encryption_key + mask_key + seed_commitment


def consistency_payload(params_digest: bytes, survivors: tuple[int, ...]) -> bytes:
    """The exact bytes a client signs in the consistency check: the round and the set U3 it was shown.

    Binds the signature to the round parameters and to the whole, ordered survivor set (through its
    SHA-256), so one signature vouches for exactly one set in exactly one round.
    """
    ids = b"".join(x.to_bytes(4, "little") for x in survivors)
    return _CONSISTENCY_LABEL + params_digest + sha256(ids)


@dataclass(frozen=True)
class AdvertiseKeys:
    """Stage 1, client -> server: a client's two round public keys and its seed commitment, signed.

    Attributes:
        round_id: the round.
        sender: client id.
        encryption_key: X25519 public key from which the share encryption keys are agreed.
        mask_key: X25519 public key used to agree pairwise mask seeds.
        seed_commitment: SHA-256 commitment to the client's seed opening (a fresh nonce and its self-mask
            seed); the server checks the opening it reconstructs at unmasking against it.
        signature: Ed25519 signature over :func:`signed_keys_payload`.
    """

    KIND: ClassVar[int] = 1
    round_id: bytes
    sender: int
    encryption_key: bytes
    mask_key: bytes
    seed_commitment: bytes
    signature: bytes

    def __post_init__(self) -> None:
        _round_id(self.round_id)
        _client_id("sender", self.sender)
        _fixed_bytes("encryption_key", self.encryption_key, PUBLIC_KEY_BYTES)
        _fixed_bytes("mask_key", self.mask_key, PUBLIC_KEY_BYTES)
        _fixed_bytes("seed_commitment", self.seed_commitment, COMMITMENT_BYTES)
        _fixed_bytes("signature", self.signature, SIGNATURE_BYTES)

    def _write(self, w: Writer) -> None:
        w.blob(self.round_id)
        w.u32(self.sender)
        w.raw(self.encryption_key)
        w.raw(self.mask_key)
        w.raw(self.seed_commitment)
        w.raw(self.signature)

    @classmethod
    def _read(cls, r: Reader) -> AdvertiseKeys:
        return cls(
            r.blob(),
            r.u32(),
            r.raw(PUBLIC_KEY_BYTES),
            r.raw(PUBLIC_KEY_BYTES),
            r.raw(COMMITMENT_BYTES),
            r.raw(SIGNATURE_BYTES),
        )

    def to_bytes(self) -> bytes:
        """Canonical, versioned encoding."""
        w = Writer(self.KIND)
        self._write(w)
        return w.finish()

    @classmethod
    def from_bytes(cls, data: bytes) -> AdvertiseKeys:
        """Parse :meth:`to_bytes` output; raises :class:`MalformedMessageError`."""
        r = Reader(data, cls.KIND)
        out = cls._read(r)
        r.end()
        return out


@dataclass(frozen=True)
class KeysBroadcast:
    """Stage 2, server -> client: the advertised keys of the receiver's surviving neighbours and its own.

    Attributes:
        round_id: the round.
        receiver: client id this broadcast is for.
        entries: :class:`AdvertiseKeys` strictly increasing by sender.
    """

    KIND: ClassVar[int] = 2
    round_id: bytes
    receiver: int
    entries: tuple[AdvertiseKeys, ...]

    def __post_init__(self) -> None:
        _round_id(self.round_id)
        _client_id("receiver", self.receiver)
        _increasing("entries", self.entries, AdvertiseKeys, lambda e: e.sender)
        if any(e.round_id != self.round_id for e in self.entries):
            raise MalformedMessageError("entries belong to another round")

    def to_bytes(self) -> bytes:
        """Canonical, versioned encoding."""
        w = Writer(self.KIND)
        w.blob(self.round_id)
        w.u32(self.receiver)
        w.records(
            _KEY_RECORD,
            [(e.sender, e.encryption_key, e.mask_key, e.seed_commitment, e.signature) for e in self.entries],
        )
        return w.finish()

    @classmethod
    def from_bytes(cls, data: bytes) -> KeysBroadcast:
        """Parse :meth:`to_bytes` output; raises :class:`MalformedMessageError`."""
        r = Reader(data, cls.KIND)
        round_id = r.blob()
        receiver = r.u32()
        entries = tuple(
            AdvertiseKeys(round_id, sender, enc, mask, commitment, sig)
            for sender, enc, mask, commitment, sig in r.records(_KEY_RECORD)
        )
        r.end()
        return cls(round_id, receiver, entries)


@dataclass(frozen=True)
class EncryptedShare:
    """The sender's two Shamir shares for one receiver, each in its own AEAD ciphertext.

    Each ciphertext is ``nonce || AES-256-GCM(share) || tag`` under a single-use key that only sender and
    receiver can derive (:func:`~fedfer.security.secagg._derive.share_keys`); the associated data binds the
    round parameters, sender, receiver and kind. The server keeps these ciphertexts: at unmasking the receiver
    reveals the key of one of them and the server decrypts it itself, so what it reconstructs from is exactly
    what the sender dealt.

    Attributes:
        sender: client id that made the shares.
        receiver: client id that can decrypt them.
        seed_ciphertext: the share of the sender's seed opening.
        key_ciphertext: the share of the sender's mask private key.
    """

    sender: int
    receiver: int
    seed_ciphertext: bytes = field(repr=False)
    key_ciphertext: bytes = field(repr=False)

    def __post_init__(self) -> None:
        _client_id("sender", self.sender)
        _client_id("receiver", self.receiver)
        if self.sender == self.receiver:
            raise MalformedMessageError("a client does not send shares to itself")
        _fixed_bytes("seed_ciphertext", self.seed_ciphertext, SHARE_CIPHERTEXT_BYTES)
        _fixed_bytes("key_ciphertext", self.key_ciphertext, SHARE_CIPHERTEXT_BYTES)


@dataclass(frozen=True)
class ShareKeys:
    """Stage 3, client -> server: the sender's encrypted shares, one per surviving neighbour.

    Attributes:
        round_id: the round.
        sender: client id.
        shares: :class:`EncryptedShare` items from ``sender``, strictly increasing by receiver.
    """

    KIND: ClassVar[int] = 3
    round_id: bytes
    sender: int
    shares: tuple[EncryptedShare, ...]

    def __post_init__(self) -> None:
        _round_id(self.round_id)
        _client_id("sender", self.sender)
        _increasing("shares", self.shares, EncryptedShare, lambda s: s.receiver)
        if any(s.sender != self.sender for s in self.shares):
            raise MalformedMessageError("every share must come from the message's sender")

    def to_bytes(self) -> bytes:
        """Canonical, versioned encoding."""
        w = Writer(self.KIND)
        w.blob(self.round_id)
        w.u32(self.sender)
        w.records(
            _SHARE_RECORD, [(s.sender, s.receiver, s.seed_ciphertext, s.key_ciphertext) for s in self.shares]
        )
        return w.finish()

    @classmethod
    def from_bytes(cls, data: bytes) -> ShareKeys:
        """Parse :meth:`to_bytes` output; raises :class:`MalformedMessageError`."""
        r = Reader(data, cls.KIND)
        round_id = r.blob()
        sender = r.u32()
        shares = tuple(EncryptedShare(*rec) for rec in r.records(_SHARE_RECORD))
        r.end()
        return cls(round_id, sender, shares)


@dataclass(frozen=True)
class SharesBroadcast:
    """Stage 4, server -> client: every encrypted share addressed to the receiver.

    Attributes:
        round_id: the round.
        receiver: client id.
        shares: :class:`EncryptedShare` items to ``receiver``, strictly increasing by sender.
    """

    KIND: ClassVar[int] = 4
    round_id: bytes
    receiver: int
    shares: tuple[EncryptedShare, ...]

    def __post_init__(self) -> None:
        _round_id(self.round_id)
        _client_id("receiver", self.receiver)
        _increasing("shares", self.shares, EncryptedShare, lambda s: s.sender)
        if any(s.receiver != self.receiver for s in self.shares):
            raise MalformedMessageError("every share must be addressed to the message's receiver")

    def to_bytes(self) -> bytes:
        """Canonical, versioned encoding."""
        w = Writer(self.KIND)
        w.blob(self.round_id)
        w.u32(self.receiver)
        w.records(
            _SHARE_RECORD, [(s.sender, s.receiver, s.seed_ciphertext, s.key_ciphertext) for s in self.shares]
        )
        return w.finish()

    @classmethod
    def from_bytes(cls, data: bytes) -> SharesBroadcast:
        """Parse :meth:`to_bytes` output; raises :class:`MalformedMessageError`."""
        r = Reader(data, cls.KIND)
        round_id = r.blob()
        receiver = r.u32()
        shares = tuple(EncryptedShare(*rec) for rec in r.records(_SHARE_RECORD))
        r.end()
        return cls(round_id, receiver, shares)


def pack_vector(vector: npt.NDArray[np.unsignedinteger[Any]], modulus_bits: int) -> bytes:
    """Pack a vector mod 2^k into ``ceil(k/8)`` little-endian bytes per element."""
    dtype = np.dtype(working_dtype(modulus_bits)).newbyteorder("<")
    arr = vector.astype(dtype, copy=False)
    bpe = (modulus_bits + 7) // 8
    if bpe == dtype.itemsize:
        return arr.tobytes()
    return np.ascontiguousarray(arr.view(np.uint8).reshape(-1, dtype.itemsize)[:, :bpe]).tobytes()


def unpack_vector(data: bytes, modulus_bits: int) -> npt.NDArray[np.unsignedinteger[Any]]:
    """Inverse of :func:`pack_vector`; raises :class:`MalformedMessageError` on a bad length or range."""
    dtype = np.dtype(working_dtype(modulus_bits)).newbyteorder("<")
    bpe = (modulus_bits + 7) // 8
    if len(data) % bpe != 0 or len(data) == 0:
        raise MalformedMessageError("vector length is not a whole number of elements")
    count = len(data) // bpe
    if bpe == dtype.itemsize:
        out: npt.NDArray[np.unsignedinteger[Any]] = np.frombuffer(data, dtype=dtype)
    else:
        padded = np.zeros((count, dtype.itemsize), dtype=np.uint8)
        padded[:, :bpe] = np.frombuffer(data, dtype=np.uint8).reshape(count, bpe)
        out = padded.view(dtype).reshape(count)
    if modulus_bits % 8 != 0 and bool(np.any(out >> dtype.type(modulus_bits))):
        raise MalformedMessageError("vector element out of range mod 2^k")
    return out


@dataclass(frozen=True, eq=False)
class MaskedInput:
    """Stage 5, client -> server: the masked, quantized, weighted update.

    Attributes:
        round_id: the round.
        sender: client id.
        modulus_bits: k; elements are integers mod 2^k.
        vector: 1-D ``uint32`` (k <= 32) or ``uint64`` array of ``dim + 1`` elements, each < 2^k (held
            read-only).
    """

    KIND: ClassVar[int] = 5
    round_id: bytes
    sender: int
    modulus_bits: int
    vector: npt.NDArray[np.unsignedinteger[Any]] = field(repr=False)

    def __post_init__(self) -> None:
        _round_id(self.round_id)
        _client_id("sender", self.sender)
        if type(self.modulus_bits) is not int or not 8 <= self.modulus_bits <= 62:
            raise MalformedMessageError("modulus_bits must be an int in 8..62")
        v = self.vector
        if type(v) is not np.ndarray or v.ndim != 1 or v.shape[0] < 2:
            raise MalformedMessageError("vector must be a 1-D numpy array")
        if v.dtype.type is not working_dtype(self.modulus_bits):
            raise MalformedMessageError("vector has the wrong dtype for modulus_bits")
        if self.modulus_bits % 8 != 0 and bool(np.any(v >> v.dtype.type(self.modulus_bits))):
            raise MalformedMessageError("vector element out of range mod 2^k")
        if v.flags.writeable:
            view = v.view()
            view.flags.writeable = False
            object.__setattr__(self, "vector", view)

    def to_bytes(self) -> bytes:
        """Canonical, versioned encoding (the vector packed to ``ceil(k/8)`` bytes per element)."""
        w = Writer(self.KIND)
        w.blob(self.round_id)
        w.u32(self.sender)
        w.u8(self.modulus_bits)
        w.blob(pack_vector(self.vector, self.modulus_bits))
        return w.finish()

    @classmethod
    def from_bytes(cls, data: bytes) -> MaskedInput:
        """Parse :meth:`to_bytes` output; raises :class:`MalformedMessageError`."""
        r = Reader(data, cls.KIND)
        round_id = r.blob()
        sender = r.u32()
        bits = r.u8()
        if not 8 <= bits <= 62:
            raise MalformedMessageError("modulus_bits must be an int in 8..62")
        vector = unpack_vector(r.blob(), bits)
        r.end()
        return cls(round_id, sender, bits, vector.astype(working_dtype(bits), copy=False))


@dataclass(frozen=True)
class ConsistencyRequest:
    """Stage 6, server -> client: the set U3 of clients whose masked input is in the sum.

    Attributes:
        round_id: the round.
        receiver: client id (a member of ``survivors``).
        survivors: every client whose masked input arrived, strictly increasing (the same set for every
            receiver; an honest client signs one set per round).
    """

    KIND: ClassVar[int] = 8
    round_id: bytes
    receiver: int
    survivors: tuple[int, ...]

    def __post_init__(self) -> None:
        _round_id(self.round_id)
        _client_id("receiver", self.receiver)
        _increasing("survivors", self.survivors, int, lambda x: x)
        for x in self.survivors:
            _client_id("client id", x)

    def to_bytes(self) -> bytes:
        """Canonical, versioned encoding."""
        w = Writer(self.KIND)
        w.blob(self.round_id)
        w.u32(self.receiver)
        w.records(_ID_RECORD, [(x,) for x in self.survivors])
        return w.finish()

    @classmethod
    def from_bytes(cls, data: bytes) -> ConsistencyRequest:
        """Parse :meth:`to_bytes` output; raises :class:`MalformedMessageError`."""
        r = Reader(data, cls.KIND)
        round_id = r.blob()
        receiver = r.u32()
        survivors = tuple(rec[0] for rec in r.records(_ID_RECORD))
        r.end()
        return cls(round_id, receiver, survivors)


@dataclass(frozen=True)
class ConsistencySignature:
    """Stage 7, client -> server: the sender's signature over :func:`consistency_payload` of U3.

    Attributes:
        round_id: the round.
        sender: client id.
        signature: Ed25519 signature by the sender's identity key.
    """

    KIND: ClassVar[int] = 9
    round_id: bytes
    sender: int
    signature: bytes

    def __post_init__(self) -> None:
        _round_id(self.round_id)
        _client_id("sender", self.sender)
        _fixed_bytes("signature", self.signature, SIGNATURE_BYTES)

    def to_bytes(self) -> bytes:
        """Canonical, versioned encoding."""
        w = Writer(self.KIND)
        w.blob(self.round_id)
        w.u32(self.sender)
        w.raw(self.signature)
        return w.finish()

    @classmethod
    def from_bytes(cls, data: bytes) -> ConsistencySignature:
        """Parse :meth:`to_bytes` output; raises :class:`MalformedMessageError`."""
        r = Reader(data, cls.KIND)
        out = cls(r.blob(), r.u32(), r.raw(SIGNATURE_BYTES))
        r.end()
        return out


@dataclass(frozen=True)
class SignedSurvivors:
    """One client's consistency-check signature, as the server forwards it to the signer's neighbours.

    Attributes:
        signer: client id whose identity key made ``signature``.
        signature: Ed25519 signature over :func:`consistency_payload`.
    """

    signer: int
    signature: bytes

    def __post_init__(self) -> None:
        _client_id("signer", self.signer)
        _fixed_bytes("signature", self.signature, SIGNATURE_BYTES)


@dataclass(frozen=True)
class UnmaskRequest:
    """Stage 8, server -> client: who among the receiver's share holders survived and who dropped.

    Attributes:
        round_id: the round.
        receiver: client id.
        survivors: clients in ``H(receiver)`` whose masked input arrived (the receiver among them),
            strictly increasing; the receiver reveals their self-mask-seed shares.
        dropped: neighbours that shared keys but sent no masked input, strictly increasing; the receiver
            reveals their mask-key shares.
        signatures: the consistency-check signatures of the receiver's neighbours over the survivor set,
            strictly increasing by signer; the receiver needs t of them (itself included) over the very set
            it signed before it reveals anything.
    """

    KIND: ClassVar[int] = 6
    round_id: bytes
    receiver: int
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]
    signatures: tuple[SignedSurvivors, ...]

    def __post_init__(self) -> None:
        _round_id(self.round_id)
        _client_id("receiver", self.receiver)
        _increasing("survivors", self.survivors, int, lambda x: x)
        _increasing("dropped", self.dropped, int, lambda x: x)
        for x in self.survivors + self.dropped:
            _client_id("client id", x)
        if set(self.survivors) & set(self.dropped):
            raise MalformedMessageError("a client cannot both survive and drop")
        _increasing("signatures", self.signatures, SignedSurvivors, lambda s: s.signer)

    def to_bytes(self) -> bytes:
        """Canonical, versioned encoding."""
        w = Writer(self.KIND)
        w.blob(self.round_id)
        w.u32(self.receiver)
        w.records(_ID_RECORD, [(x,) for x in self.survivors])
        w.records(_ID_RECORD, [(x,) for x in self.dropped])
        w.records(_SIGNED_RECORD, [(s.signer, s.signature) for s in self.signatures])
        return w.finish()

    @classmethod
    def from_bytes(cls, data: bytes) -> UnmaskRequest:
        """Parse :meth:`to_bytes` output; raises :class:`MalformedMessageError`."""
        r = Reader(data, cls.KIND)
        round_id = r.blob()
        receiver = r.u32()
        survivors = tuple(rec[0] for rec in r.records(_ID_RECORD))
        dropped = tuple(rec[0] for rec in r.records(_ID_RECORD))
        signatures = tuple(SignedSurvivors(*rec) for rec in r.records(_SIGNED_RECORD))
        r.end()
        return cls(round_id, receiver, survivors, dropped, signatures)


@dataclass(frozen=True)
class RevealedKey:
    """The single-use key that opens one share ciphertext ``owner`` sent to the revealing client.

    Attributes:
        owner: the client whose secret the ciphertext holds a share of (its sender).
        key: the 32-byte AEAD key (redacted from repr).
    """

    owner: int
    key: bytes = field(repr=False)

    def __post_init__(self) -> None:
        _client_id("owner", self.owner)
        _fixed_bytes("key", self.key, SHARE_KEY_BYTES)


@dataclass(frozen=True)
class UnmaskResponse:
    """Stage 9, client -> server: what the server needs to remove the masks, never both kinds for one client.

    Attributes:
        round_id: the round.
        sender: client id (a survivor).
        own_seed_share: the sender's share of its own seed opening (66 bytes, redacted from repr).
        seed_keys: keys opening the seed-share ciphertexts of the other surviving neighbours, strictly
            increasing by owner.
        key_keys: keys opening the mask-key-share ciphertexts of dropped neighbours, strictly increasing by
            owner.
    """

    KIND: ClassVar[int] = 7
    round_id: bytes
    sender: int
    own_seed_share: bytes = field(repr=False)
    seed_keys: tuple[RevealedKey, ...] = ()
    key_keys: tuple[RevealedKey, ...] = ()

    def __post_init__(self) -> None:
        _round_id(self.round_id)
        _client_id("sender", self.sender)
        _fixed_bytes("own_seed_share", self.own_seed_share, SHARE_BYTES)
        _increasing("seed_keys", self.seed_keys, RevealedKey, lambda s: s.owner)
        _increasing("key_keys", self.key_keys, RevealedKey, lambda s: s.owner)
        owners = {s.owner for s in self.seed_keys}
        if owners & {s.owner for s in self.key_keys}:
            raise MalformedMessageError("never reveal both secrets of one client")
        if self.sender in owners or self.sender in {s.owner for s in self.key_keys}:
            raise MalformedMessageError("the sender's own share travels in own_seed_share")

    def to_bytes(self) -> bytes:
        """Canonical, versioned encoding."""
        w = Writer(self.KIND)
        w.blob(self.round_id)
        w.u32(self.sender)
        w.raw(self.own_seed_share)
        w.records(_REVEALED_RECORD, [(s.owner, s.key) for s in self.seed_keys])
        w.records(_REVEALED_RECORD, [(s.owner, s.key) for s in self.key_keys])
        return w.finish()

    @classmethod
    def from_bytes(cls, data: bytes) -> UnmaskResponse:
        """Parse :meth:`to_bytes` output; raises :class:`MalformedMessageError`."""
        r = Reader(data, cls.KIND)
        round_id = r.blob()
        sender = r.u32()
        own = r.raw(SHARE_BYTES)
        seed = tuple(RevealedKey(*rec) for rec in r.records(_REVEALED_RECORD))
        keys = tuple(RevealedKey(*rec) for rec in r.records(_REVEALED_RECORD))
        r.end()
        return cls(round_id, sender, own, seed, keys)


Message: TypeAlias = (
    AdvertiseKeys
    | KeysBroadcast
    | ShareKeys
    | SharesBroadcast
    | MaskedInput
    | ConsistencyRequest
    | ConsistencySignature
    | UnmaskRequest
    | UnmaskResponse
)
"""Any top-level secure-aggregation message."""

ClientMessage: TypeAlias = AdvertiseKeys | ShareKeys | MaskedInput | ConsistencySignature | UnmaskResponse
"""A message a client sends to the server (one per collecting stage, :data:`STAGE_MESSAGE`)."""

_BY_KIND: dict[int, Callable[[bytes], Message]] = {
    cls.KIND: cls.from_bytes
    for cls in (
        AdvertiseKeys,
        KeysBroadcast,
        ShareKeys,
        SharesBroadcast,
        MaskedInput,
        ConsistencyRequest,
        ConsistencySignature,
        UnmaskRequest,
        UnmaskResponse,
    )
}


def decode_message(data: bytes) -> Message:
    """Parse any top-level message from its canonical encoding.

    Args:
        data: output of some message's ``to_bytes()``.

    Returns:
        The message object.

    Raises:
        MalformedMessageError: on an unknown kind or any encoding/validation failure.
    """
    kind = peek_kind(data)
    parser = _BY_KIND.get(kind)
    if parser is None:
        raise MalformedMessageError("unknown message kind")
    return parser(data)


#: The message a client sends in each collecting stage (what the server and the aggregator accept in it).
STAGE_MESSAGE: dict[Stage, type[ClientMessage]] = {
    Stage.ADVERTISE_KEYS: AdvertiseKeys,
    Stage.SHARE_KEYS: ShareKeys,
    Stage.MASKED_INPUT: MaskedInput,
    Stage.CONSISTENCY_CHECK: ConsistencySignature,
    Stage.UNMASK: UnmaskResponse,
}
