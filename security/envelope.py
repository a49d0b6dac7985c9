"""Envelope encryption for data at rest: a key-encryption key (KEK) wraps one data key (DEK) per session.

Pure and I/O-free: this module never opens a file or a database. It turns keys into *handles* and bytes into
authenticated ciphertexts; where the bytes live is the caller's business (``agent/store/cache.py``).

Choices, fixed on purpose:

* AES-256-GCM for both DEK wrapping and records, with a fresh 96-bit nonce from the OS CSPRNG per message,
  through the project's one AEAD wrapper (:mod:`fedfer.security.crypto`); this module adds no cipher of its
  own.
* Associated data is mandatory and built here, never by callers: a wrapped DEK is bound to (cache id,
  session id, purpose); a record to (cache id, session id, position, kind, format version). A ciphertext
  therefore cannot be moved to another cache, session or position, nor relabelled as another kind, without
  failing verification.
* Every verification failure raises the same uninformative :class:`~fedfer.security.errors.IntegrityError`.
* Keys are handles: no public constructor, no pickling or copying, a redacted ``repr``; the only way to see
  a key's bytes is the loudly named :meth:`KeyEncryptionKey.dangerously_export_plaintext`. Data keys have
  no plaintext export at all: they leave a handle only wrapped under a KEK.

Wire formats (``v`` = :data:`FORMAT_VERSION`, one byte)::

    wrapped DEK = v || nonce(12) || AES-GCM(KEK, DEK(32)) || tag(16)          61 bytes
    record      = v || nonce(12) || AES-GCM(DEK, plaintext) || tag(16)      len(plaintext) + 29 bytes

Python cannot reliably erase memory: handles drop their references when the caller drops the handle, but
copies of key bytes may linger in freed heap memory until it is reused.
"""

from __future__ import annotations

import os
import struct
from typing import Final, NoReturn

from fedfer.security.crypto import (
    AEAD_KEY_BYTES,
    AEAD_NONCE_BYTES,
    AEAD_TAG_BYTES,
    RandomBytes,
    aead_decrypt,
    aead_encrypt,
    hkdf_sha256,
)
from fedfer.security.errors import IntegrityError, ValidationError

__all__ = [
    "FORMAT_VERSION",
    "KEY_BYTES",
    "NONCE_BYTES",
    "RECORD_OVERHEAD",
    "WRAPPED_KEY_BYTES",
    "DataKey",
    "KeyEncryptionKey",
    "RecordKind",
]

FORMAT_VERSION: Final = 1
KEY_BYTES: Final = AEAD_KEY_BYTES
NONCE_BYTES: Final = AEAD_NONCE_BYTES
_TAG_BYTES: Final = AEAD_TAG_BYTES
RECORD_OVERHEAD: Final = 1 + NONCE_BYTES + _TAG_BYTES
WRAPPED_KEY_BYTES: Final = RECORD_OVERHEAD + KEY_BYTES

_MAX_ID_BYTES: Final = 255
_MAX_POSITION: Final = 2**63 - 1
# GCM with random 96-bit nonces stays far below the 2^-32 collision bound for 2^32 messages per key; one
# session never comes near, but the limit is enforced so that a runaway writer cannot get there either.
_MAX_MESSAGES_PER_KEY: Final = 2**32

_WRAP_LABEL: Final = b"fedfer/envelope/v1/dek-wrap"
_RECORD_LABEL: Final = b"fedfer/envelope/v1/record"
_FINGERPRINT_LABEL: Final = b"fedfer/envelope/v1/kek-fingerprint"

_HANDLE_TOKEN: Final = object()


class RecordKind:
    """Kinds of record a data key may seal; the kind is bound into the associated data."""

    FRAME: Final = 1
    """One processed frame (features, probabilities, box, score, timestamp)."""
    SEAL: Final = 2
    """The closing record of a session, carrying the authenticated frame count."""
    BLOB: Final = 3
    """A named item kept beside the sessions (e.g. the personalized model), under its own data key."""

    ALL: Final = frozenset({FRAME, SEAL, BLOB})


def _fail() -> NoReturn:
    # One message for every failure mode: callers (and attackers) learn only that verification failed.
    raise IntegrityError("authenticated decryption failed")


def _check_id(name: str, value: bytes) -> bytes:
    if type(value) is not bytes or not 1 <= len(value) <= _MAX_ID_BYTES:
        raise ValidationError(f"{name} must be 1..{_MAX_ID_BYTES} bytes")
    return value


def _length_prefixed(*parts: bytes) -> bytes:
    return b"".join(struct.pack(">B", len(p)) + p for p in parts)


def _wrap_ad(cache_id: bytes, session_id: bytes) -> bytes:
    return (
        _WRAP_LABEL
        + struct.pack(">B", FORMAT_VERSION)
        + _length_prefixed(_check_id("cache_id", cache_id), _check_id("session_id", session_id))
    )


def _record_ad(cache_id: bytes, session_id: bytes, position: int, kind: int) -> bytes:
    if type(position) is not int or not 0 <= position <= _MAX_POSITION:
        raise ValidationError("position must be a non-negative int")
    if type(kind) is not int or kind not in RecordKind.ALL:
        raise ValidationError("unknown record kind")
    return (
        _RECORD_LABEL
        + struct.pack(">B", FORMAT_VERSION)
        + _length_prefixed(_check_id("cache_id", cache_id), _check_id("session_id", session_id))
        + struct.pack(">QH", position, kind)
    )


def _seal(
    material: bytes, plaintext: bytes, associated_data: bytes, _random_bytes: RandomBytes = os.urandom
) -> bytes:
    """AES-256-GCM through ``fedfer.security.crypto`` with the version header; ``_random_bytes`` is the test
    seam."""
    header = struct.pack(">B", FORMAT_VERSION)
    # The version byte is authenticated: it is part of the associated data as well as the header.
    return header + aead_encrypt(
        material, plaintext, associated_data=header + associated_data, _random_bytes=_random_bytes
    )


def _open(material: bytes, blob: bytes, associated_data: bytes) -> bytes:
    if type(blob) is not bytes or len(blob) < RECORD_OVERHEAD or blob[0] != FORMAT_VERSION:
        _fail()
    try:
        return aead_decrypt(material, blob[1:], associated_data=blob[:1] + associated_data)
    except IntegrityError:
        _fail()


class _KeyHandle:
    """Common behaviour of key handles: no public construction, no pickling, no copying, redacted repr."""

    __slots__ = ("__weakref__", "_material", "_messages")

    def __init__(self, token: object, material: bytes) -> None:
        if token is not _HANDLE_TOKEN:
            raise TypeError(f"{type(self).__name__} has no public constructor; use generate()")
        if type(material) is not bytes or len(material) != KEY_BYTES:
            raise ValidationError(f"a key is exactly {KEY_BYTES} bytes")
        self._material = material
        self._messages = 0

    def __repr__(self) -> str:
        return f"<{type(self).__name__} [redacted]>"

    def __reduce__(self) -> NoReturn:
        raise TypeError(f"{type(self).__name__} cannot be pickled or copied")

    def __reduce_ex__(self, protocol: object) -> NoReturn:
        raise TypeError(f"{type(self).__name__} cannot be pickled or copied")

    def _count_message(self) -> None:
        self._messages += 1
        if self._messages > _MAX_MESSAGES_PER_KEY:
            raise ValidationError("key usage limit reached; start a new session")


class DataKey(_KeyHandle):
    """A per-session data key (AES-256-GCM) that seals the session's records.

    Obtain one with :meth:`generate` or :meth:`KeyEncryptionKey.unwrap_data_key`; store it only wrapped.
    """

    __slots__ = ()

    @classmethod
    def generate(cls) -> DataKey:
        """Return a fresh random data key from the OS CSPRNG."""
        return cls(_HANDLE_TOKEN, os.urandom(KEY_BYTES))

    def encrypt_record(
        self, plaintext: bytes, *, cache_id: bytes, session_id: bytes, position: int, kind: int
    ) -> bytes:
        """Seal one record bound to its cache, session, position and kind.

        Args:
            plaintext: the serialized record.
            cache_id: identifier of the cache instance (1..255 bytes).
            session_id: identifier of the session (1..255 bytes).
            position: the record's index within the session (0-based).
            kind: a :class:`RecordKind` value.

        Returns:
            ``version || nonce || ciphertext || tag``.

        Raises:
            ValidationError: an argument is malformed.
        """
        if type(plaintext) is not bytes:
            raise ValidationError("plaintext must be bytes")
        ad = _record_ad(cache_id, session_id, position, kind)
        self._count_message()
        return _seal(self._material, plaintext, ad)

    def decrypt_record(
        self, blob: bytes, *, cache_id: bytes, session_id: bytes, position: int, kind: int
    ) -> bytes:
        """Verify and open a record sealed by :meth:`encrypt_record` with the same binding.

        Raises:
            IntegrityError: the blob was tampered with, truncated, sealed under another key or bound to a
                different cache, session, position or kind.
            ValidationError: an argument is malformed.
        """
        return _open(self._material, blob, _record_ad(cache_id, session_id, position, kind))


class KeyEncryptionKey(_KeyHandle):
    """A 256-bit key-encryption key that wraps :class:`DataKey` handles (AES-256-GCM).

    The KEK is the one long-lived secret of a cache; its persistence (a 0600 file, the OS keyring) is the
    caller's job, through the loudly named plaintext import/export pair.
    """

    __slots__ = ("_fingerprint",)

    def __init__(self, token: object, material: bytes) -> None:
        super().__init__(token, material)
        # HKDF is a PRF keyed by the KEK: the output identifies the key and reveals nothing about it.
        self._fingerprint = hkdf_sha256(material, info=_FINGERPRINT_LABEL, length=16).hex()

    @classmethod
    def generate(cls) -> KeyEncryptionKey:
        """Return a fresh random KEK from the OS CSPRNG."""
        return cls(_HANDLE_TOKEN, os.urandom(KEY_BYTES))

    @classmethod
    def dangerously_import_plaintext(cls, material: bytes) -> KeyEncryptionKey:
        """Build a handle from raw key bytes read from protected storage (a 0600 file, the OS keyring).

        Raises:
            ValidationError: ``material`` is not exactly 32 bytes.
        """
        if type(material) is not bytes or len(material) != KEY_BYTES:
            raise ValidationError(f"a key-encryption key is exactly {KEY_BYTES} bytes")
        return cls(_HANDLE_TOKEN, material)

    def dangerously_export_plaintext(self) -> bytes:
        """Return the raw key bytes, for writing to protected storage only. Never log or transmit them."""
        return self._material

    @property
    def fingerprint(self) -> str:
        """A non-secret identifier (HKDF of the key with a fixed label, 128 bits, hex) naming this KEK."""
        return self._fingerprint

    def wrap_data_key(self, dek: DataKey, *, cache_id: bytes, session_id: bytes) -> bytes:
        """Encrypt ``dek`` under this KEK, bound to its cache and session.

        Returns:
            A :data:`WRAPPED_KEY_BYTES`-byte blob safe to store beside the records.
        """
        if not isinstance(dek, DataKey):
            raise ValidationError("dek must be a DataKey")
        ad = _wrap_ad(cache_id, session_id)
        self._count_message()
        return _seal(self._material, dek._material, ad)

    def unwrap_data_key(self, wrapped: bytes, *, cache_id: bytes, session_id: bytes) -> DataKey:
        """Verify and unwrap a data key wrapped by :meth:`wrap_data_key` for the same cache and session.

        Raises:
            IntegrityError: wrong KEK, tampered blob, or a blob wrapped for another cache or session.
        """
        material = _open(self._material, wrapped, _wrap_ad(cache_id, session_id))
        if len(material) != KEY_BYTES:
            _fail()
        return DataKey(_HANDLE_TOKEN, material)
