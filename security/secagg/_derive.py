"""Key-derivation labels and mask expansion shared by client and server (private).

Every derived key is bound by HKDF to the round-parameter digest (salt) and to its purpose and parties
(info), so no key is ever used for two purposes, two pairs or two rounds.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from fedfer.security.crypto import Keystream, hkdf_sha256, sha256

_ENC = b"fedfer/secagg/v2/share-encryption"
_SHARE_KEYS = b"fedfer/secagg/v2/share-keys"
_PAIR = b"fedfer/secagg/v1/pairwise-mask"
_SELF = b"fedfer/secagg/v1/self-mask"
_AD = b"fedfer/secagg/v2/share"
_COMMIT = b"fedfer/secagg/v2/seed-commitment"

SEED_BYTES = 32
"""Length of a client's self-mask seed."""
OPENING_BYTES = 64
"""Length of the secret a client shares for its self mask: a fresh commitment nonce followed by the seed."""
SEED_SHARE = 1
"""Kind byte of the ciphertext that carries a share of the sender's seed opening."""
KEY_SHARE = 2
"""Kind byte of the ciphertext that carries a share of the sender's mask private key."""


def _pair(a: int, b: int) -> bytes:
    lo, hi = (a, b) if a < b else (b, a)
    return lo.to_bytes(4, "little") + hi.to_bytes(4, "little")


def encryption_info(a: int, b: int) -> bytes:
    """HKDF info for the secret that clients a and b agree from their encryption keys (either order)."""
    return _ENC + _pair(a, b)


def share_keys(pair_secret: bytes, digest: bytes, *, sender: int, receiver: int) -> tuple[bytes, bytes]:
    """The single-use AEAD keys of the shares ``sender`` sends ``receiver``: (seed-share key, key-share key).

    Expanded from the pair's agreed secret with HKDF bound to the round, the direction and the purpose, so a
    receiver that reveals one of them (to let the server open exactly that ciphertext) reveals nothing about
    the other, about the shares going the other way, or about the pair's secret.
    """
    info = _SHARE_KEYS + sender.to_bytes(4, "little") + receiver.to_bytes(4, "little")
    both = hkdf_sha256(pair_secret, info=info, salt=digest, length=64)
    return both[:32], both[32:]


def seed_commitment(digest: bytes, sender: int, opening: bytes) -> bytes:
    """SHA-256 commitment to a client's seed opening (``nonce || seed``), bound to the round and the client.

    Hiding because the opening holds a fresh 32-byte nonce beside the 32-byte seed (the server never sees the
    opening of a client that dropped); binding because SHA-256 is collision resistant.
    """
    return sha256(_COMMIT + digest + sender.to_bytes(4, "little") + opening)


def seed_of(opening: bytes) -> bytes:
    """The self-mask seed inside a seed opening (``nonce || seed``)."""
    return opening[OPENING_BYTES - SEED_BYTES :]


def pairwise_info(a: int, b: int) -> bytes:
    """HKDF info for the pairwise mask seed of clients a and b."""
    return _PAIR + _pair(a, b)


def self_mask_key(seed: bytes, digest: bytes) -> bytes:
    """Keystream key of a client's self mask, from its secret seed."""
    return hkdf_sha256(seed, info=_SELF, salt=digest)


def share_ad(digest: bytes, sender: int, receiver: int, kind: int) -> bytes:
    """AEAD associated data binding an encrypted share to the round, its sender, its receiver and its kind."""
    return _AD + digest + sender.to_bytes(4, "little") + receiver.to_bytes(4, "little") + bytes([kind])


def pairwise_sign(owner: int, peer: int) -> int:
    """+1 if ``owner`` adds the pairwise mask it shares with ``peer``, -1 if it subtracts it."""
    return 1 if peer > owner else -1


def reduce_mod(vector: npt.NDArray[np.unsignedinteger[Any]], modulus_bits: int) -> None:
    """Reduce ``vector`` mod 2^modulus_bits in place (a no-op when that is the dtype's own width)."""
    if modulus_bits < 8 * vector.dtype.itemsize:
        np.bitwise_and(vector, vector.dtype.type((1 << modulus_bits) - 1), out=vector)


class MaskApplier:
    """Adds or subtracts keystream-expanded masks in place, mod 2^32 or 2^64 (reduced mod 2^k at decode).

    Args:
        length: vector length.
        dtype: ``numpy.uint32`` or ``numpy.uint64``.
    """

    __slots__ = ("_dtype", "_length", "_stream", "generated_bytes")

    def __init__(self, *, length: int, dtype: type[np.unsignedinteger[Any]]) -> None:
        self._length = length
        self._dtype = np.dtype(dtype).newbyteorder("<")
        self._stream = Keystream(nbytes=length * self._dtype.itemsize)
        self.generated_bytes = 0

    def apply(self, acc: npt.NDArray[np.unsignedinteger[Any]], key: bytes, sign: int) -> None:
        """``acc += sign * PRG(key)`` in place (wrapping)."""
        mask = np.frombuffer(self._stream.generate(key), dtype=self._dtype, count=self._length)
        self.generated_bytes += self._stream.nbytes
        if sign > 0:
            np.add(acc, mask, out=acc)
        else:
            np.subtract(acc, mask, out=acc)
