"""Symmetric primitives wrapped once, with fixed choices: HKDF-SHA256, AES-256-GCM, SHA-256, keystreams.

Every HKDF call takes a non-empty ``info`` label and every AEAD call takes non-empty associated data: there is
no way to call them without saying what the key or ciphertext is for. Verification failures raise
:class:`~fedfer.security.errors.IntegrityError` and nothing else (no booleans, no reasons).

The mask PRG is AES-256-CTR with an all-zero initial counter block: each key is derived for exactly one
keystream (HKDF binds round, parties and purpose), so the counter never repeats under a key. On this machine
AES-256-CTR (AES-NI) measured ~6 GB/s against ~3 GB/s for ChaCha20, so AES-CTR is the protocol's PRG;
:class:`Keystream` also offers ChaCha20 so benchmarks can re-measure both and report the faster one.

Randomness defaults to the OS CSPRNG (:func:`os.urandom`). Functions that draw randomness accept a private
``_random_bytes`` seam so tests can replay fixed vectors; production code never passes it.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedfer.security.errors import IntegrityError, ValidationError

__all__ = [
    "AEAD_KEY_BYTES",
    "AEAD_NONCE_BYTES",
    "AEAD_TAG_BYTES",
    "KEYSTREAM_ALGORITHMS",
    "KEYSTREAM_KEY_BYTES",
    "Keystream",
    "RandomBytes",
    "aead_decrypt",
    "aead_encrypt",
    "hkdf_sha256",
    "sha256",
]

RandomBytes = Callable[[int], bytes]
"""A source of uniformly random bytes: ``f(n) -> n bytes``. Production uses :func:`os.urandom`."""

AEAD_KEY_BYTES = 32
AEAD_NONCE_BYTES = 12
AEAD_TAG_BYTES = 16
KEYSTREAM_KEY_BYTES = 32
_MAX_HKDF_BYTES = 255 * 32
_ZERO_COUNTER = bytes(16)


def _require_bytes(name: str, value: object, *, min_len: int = 0, exact: int | None = None) -> bytes:
    if type(value) is not bytes:
        raise ValidationError(f"{name} must be bytes")
    if exact is not None and len(value) != exact:
        raise ValidationError(f"{name} must be exactly {exact} bytes")
    if len(value) < min_len:
        raise ValidationError(f"{name} must be at least {min_len} bytes")
    return value


def sha256(data: bytes) -> bytes:
    """Return the SHA-256 digest of ``data``.

    Args:
        data: bytes to hash.

    Returns:
        The 32-byte digest.
    """
    _require_bytes("data", data)
    h = hashes.Hash(hashes.SHA256())
    h.update(data)
    return h.finalize()


def hkdf_sha256(ikm: bytes, *, info: bytes, length: int = 32, salt: bytes | None = None) -> bytes:
    """Derive ``length`` bytes from input keying material with HKDF-SHA256 (RFC 5869).

    Args:
        ikm: input keying material (for example a Diffie-Hellman shared secret or a random seed).
        info: mandatory, non-empty label saying what the output is for (binds purpose and parties).
        length: number of output bytes, 1..8160.
        salt: optional salt (for example a digest of the round parameters); ``None`` means the RFC default.

    Returns:
        The derived bytes.

    Raises:
        ValidationError: on a missing label, bad types or an impossible length.
    """
    _require_bytes("ikm", ikm, min_len=1)
    _require_bytes("info", info, min_len=1)
    if salt is not None:
        _require_bytes("salt", salt)
    if type(length) is not int or not 1 <= length <= _MAX_HKDF_BYTES:
        raise ValidationError(f"length must be an int in 1..{_MAX_HKDF_BYTES}")
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)


def aead_encrypt(
    key: bytes,
    plaintext: bytes,
    *,
    associated_data: bytes,
    _random_bytes: RandomBytes = os.urandom,
) -> bytes:
    """Encrypt and authenticate with AES-256-GCM under a fresh random 96-bit nonce.

    Args:
        key: 32-byte key.
        plaintext: bytes to encrypt.
        associated_data: mandatory, non-empty context bound to the ciphertext (who, what, when).
        _random_bytes: private test seam for the nonce; production uses the OS CSPRNG.

    Returns:
        ``nonce || ciphertext || tag``.

    Raises:
        ValidationError: on bad key length, types or empty associated data.
    """
    _require_bytes("key", key, exact=AEAD_KEY_BYTES)
    _require_bytes("plaintext", plaintext)
    _require_bytes("associated_data", associated_data, min_len=1)
    nonce = _random_bytes(AEAD_NONCE_BYTES)
    if type(nonce) is not bytes or len(nonce) != AEAD_NONCE_BYTES:
        raise ValidationError("random source returned a malformed nonce")
    return nonce + AESGCM(key).encrypt(nonce, plaintext, associated_data)


def aead_decrypt(key: bytes, sealed: bytes, *, associated_data: bytes) -> bytes:
    """Verify and decrypt the output of :func:`aead_encrypt`.

    Args:
        key: the 32-byte key used to encrypt.
        sealed: ``nonce || ciphertext || tag``.
        associated_data: the exact associated data used to encrypt.

    Returns:
        The plaintext.

    Raises:
        IntegrityError: if ciphertext, tag, key or associated data do not match (deliberately vague).
        ValidationError: on bad argument types or key length.
    """
    _require_bytes("key", key, exact=AEAD_KEY_BYTES)
    _require_bytes("associated_data", associated_data, min_len=1)
    if type(sealed) is not bytes:
        raise ValidationError("sealed must be bytes")
    if len(sealed) < AEAD_NONCE_BYTES + AEAD_TAG_BYTES:
        raise IntegrityError("authenticated decryption failed")
    try:
        return AESGCM(key).decrypt(sealed[:AEAD_NONCE_BYTES], sealed[AEAD_NONCE_BYTES:], associated_data)
    except InvalidTag:
        raise IntegrityError("authenticated decryption failed") from None


KEYSTREAM_ALGORITHMS = ("aes-256-ctr", "chacha20")
"""Keystream ciphers :class:`Keystream` offers; the protocol's masks always use the first."""


class Keystream:
    """A reusable keystream generator (AES-256-CTR by default) writing into one preallocated buffer.

    Generating a mask is the protocol's dominant cost, so this avoids every avoidable copy: the keystream
    is produced by ``update_into`` straight into an internal buffer, and callers view it (for example with
    ``numpy.frombuffer``) without copying. The view returned by :meth:`generate` is overwritten by the next
    call; consume it first.

    Args:
        nbytes: keystream length per key, in bytes (> 0).
        algorithm: ``"aes-256-ctr"`` (the protocol's PRG) or ``"chacha20"`` (for speed comparisons).
    """

    __slots__ = ("_algorithm", "_buf", "_nbytes", "_zeros")

    def __init__(self, *, nbytes: int, algorithm: str = "aes-256-ctr") -> None:
        if type(nbytes) is not int or nbytes <= 0:
            raise ValidationError("nbytes must be a positive int")
        if algorithm not in KEYSTREAM_ALGORITHMS:
            raise ValidationError(f"algorithm must be one of {KEYSTREAM_ALGORITHMS}")
        self._algorithm = algorithm
        self._nbytes = nbytes
        self._zeros = bytes(nbytes)
        # update_into needs room for one extra (partial) block.
        self._buf = bytearray(nbytes + 15)

    @property
    def nbytes(self) -> int:
        """Keystream length produced per key."""
        return self._nbytes

    def generate(self, key: bytes) -> memoryview:
        """Return the first ``nbytes`` of the keystream for ``key`` (counter block / nonce all zero).

        Args:
            key: a 32-byte key used for this one keystream only (derive it with :func:`hkdf_sha256`).

        Returns:
            A read-only view of the internal buffer, valid until the next call.
        """
        _require_bytes("key", key, exact=KEYSTREAM_KEY_BYTES)
        if self._algorithm == "aes-256-ctr":
            enc = Cipher(algorithms.AES(key), modes.CTR(_ZERO_COUNTER)).encryptor()
        else:
            enc = Cipher(algorithms.ChaCha20(key, _ZERO_COUNTER), mode=None).encryptor()
        written = enc.update_into(self._zeros, self._buf)
        if written != self._nbytes:  # pragma: no cover - CTR is a stream mode, this cannot happen
            raise IntegrityError("keystream generation failed")
        return memoryview(self._buf)[: self._nbytes].toreadonly()

    def __repr__(self) -> str:
        return f"Keystream(nbytes={self._nbytes}, algorithm={self._algorithm!r})"
