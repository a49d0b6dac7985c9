"""Key handles: private keys you can use but not casually see, copy, pickle or print.

Modelled on Tink's ``KeysetHandle``: handles have no public constructor from raw bytes (use
:meth:`IdentityKey.generate` / :meth:`AgreementKey.generate`, :meth:`IdentityKey.from_pem`, or the loudly
named ``dangerously_import_*`` loaders), refuse pickling and copying, and have a redacted ``repr``. Key
material leaves a handle only through a method named ``dangerously_export_*`` (the one spelling fedfer uses
for every plaintext key export, :mod:`fedfer.security.envelope` and :mod:`fedfer.security.pki` included):
grep for ``dangerously_`` to audit each place.

- :class:`IdentityKey` is a device's long-lived Ed25519 signing key (its public half is in the device
  certificate / registry): it signs round keys and the enrollment binding, and is stored as PKCS#8 PEM.
- :class:`AgreementKey` is an ephemeral X25519 key for one round; :meth:`AgreementKey.derive` runs the
  Diffie-Hellman exchange and feeds the shared secret straight into HKDF, so the raw shared secret is never
  returned.
"""

from __future__ import annotations

import os
from typing import Any, NoReturn

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from fedfer.security.crypto import RandomBytes, hkdf_sha256
from fedfer.security.errors import IntegrityError, ValidationError

__all__ = [
    "PRIVATE_KEY_BYTES",
    "PUBLIC_KEY_BYTES",
    "SIGNATURE_BYTES",
    "AgreementKey",
    "IdentityKey",
    "load_pem_private_key",
    "verify_signature",
]

PUBLIC_KEY_BYTES = 32
PRIVATE_KEY_BYTES = 32
SIGNATURE_BYTES = 64
_TOKEN = object()
_MAX_PEM = 64 * 1024


def load_pem_private_key(data: object, *, what: str) -> PrivateKeyTypes:
    """The private key in unencrypted PKCS#8 ``data`` (at most 64 KiB), for the handles that wrap one.

    Raises:
        ValidationError: ``data`` is not PEM bytes of a private key (the message names ``what``).
    """
    if not isinstance(data, bytes) or len(data) > _MAX_PEM:
        raise ValidationError(f"{what} must be PEM bytes")
    try:
        return serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ValidationError(f"{what} is not a readable PEM private key") from exc


def _raw_private(raw: object, what: str) -> bytes:
    if type(raw) is not bytes or len(raw) != PRIVATE_KEY_BYTES:
        raise ValidationError(f"{what} private key must be {PRIVATE_KEY_BYTES} bytes")
    return raw


def _random_private(random_bytes: RandomBytes) -> bytes:
    raw = random_bytes(PRIVATE_KEY_BYTES)
    return _raw_private(raw, "generated")


class _Handle:
    """Shared behaviour of key handles: no pickling, no copying, redacted repr."""

    __slots__ = ()

    def __reduce__(self) -> NoReturn:
        raise TypeError(f"{type(self).__name__} cannot be pickled")

    def __reduce_ex__(self, protocol: Any) -> NoReturn:
        raise TypeError(f"{type(self).__name__} cannot be pickled")

    def __copy__(self) -> NoReturn:
        raise TypeError(f"{type(self).__name__} cannot be copied")

    def __deepcopy__(self, memo: Any) -> NoReturn:
        raise TypeError(f"{type(self).__name__} cannot be copied")

    def __getstate__(self) -> NoReturn:
        raise TypeError(f"{type(self).__name__} cannot be serialized")


class IdentityKey(_Handle):
    """A device's Ed25519 identity (signing) key handle.

    Construct with :meth:`generate`, :meth:`from_pem` or :meth:`dangerously_import_private_bytes`; direct
    construction is refused.
    """

    __slots__ = ("_key", "_public")

    def __init__(self, key: Ed25519PrivateKey, token: object) -> None:
        if token is not _TOKEN or not isinstance(key, Ed25519PrivateKey):
            raise TypeError("use IdentityKey.generate() or IdentityKey.from_pem()")
        self._key = key
        self._public = key.public_key().public_bytes_raw()

    @classmethod
    def generate(cls, *, _random_bytes: RandomBytes = os.urandom) -> IdentityKey:
        """Create a fresh identity key from the OS CSPRNG.

        Args:
            _random_bytes: private test seam; production never passes it.

        Returns:
            A new handle.
        """
        return cls(Ed25519PrivateKey.from_private_bytes(_random_private(_random_bytes)), _TOKEN)

    @classmethod
    def dangerously_import_private_bytes(cls, raw: bytes) -> IdentityKey:
        """Load a handle from a raw 32-byte Ed25519 seed (for key storage code only).

        Args:
            raw: the 32-byte private seed.

        Returns:
            A handle.

        Raises:
            ValidationError: if ``raw`` is not 32 bytes.
        """
        return cls(Ed25519PrivateKey.from_private_bytes(_raw_private(raw, "Ed25519")), _TOKEN)

    @classmethod
    def from_pem(cls, data: bytes) -> IdentityKey:
        """Load an unencrypted PKCS#8 PEM Ed25519 private key (as :meth:`dangerously_export_pem` writes it).

        Raises:
            ValidationError: not a PEM Ed25519 private key.
        """
        key = load_pem_private_key(data, what="identity key")
        if not isinstance(key, Ed25519PrivateKey):
            raise ValidationError("identity key must be Ed25519")
        return cls(key, _TOKEN)

    def dangerously_export_private_bytes(self) -> bytes:
        """Return the raw 32-byte private seed. Only for sealing into encrypted storage."""
        return self._key.private_bytes_raw()

    def dangerously_export_pem(self) -> bytes:
        """Return the private key as UNENCRYPTED PKCS#8 PEM. Write it only to a 0600 file."""
        return self._key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def public_bytes(self) -> bytes:
        """The 32-byte Ed25519 public key."""
        return self._public

    def sign(self, message: bytes) -> bytes:
        """Sign ``message`` (pure Ed25519).

        Args:
            message: bytes to sign; callers prefix a domain-separation label.

        Returns:
            The 64-byte signature.
        """
        if type(message) is not bytes:
            raise ValidationError("message must be bytes")
        return self._key.sign(message)

    def __repr__(self) -> str:
        return "IdentityKey(<redacted>)"


class AgreementKey(_Handle):
    """An X25519 key-agreement handle (ephemeral, one per purpose per round).

    Construct with :meth:`generate` or :meth:`dangerously_import_private_bytes`; direct construction is
    refused.
    """

    __slots__ = ("_key", "_public")

    def __init__(self, key: X25519PrivateKey, token: object) -> None:
        if token is not _TOKEN or not isinstance(key, X25519PrivateKey):
            raise TypeError("use AgreementKey.generate() or AgreementKey.dangerously_import_private_bytes()")
        self._key = key
        self._public = key.public_key().public_bytes_raw()

    @classmethod
    def generate(cls, *, _random_bytes: RandomBytes = os.urandom) -> AgreementKey:
        """Create a fresh X25519 key from the OS CSPRNG.

        Args:
            _random_bytes: private test seam; production never passes it.

        Returns:
            A new handle.
        """
        return cls(X25519PrivateKey.from_private_bytes(_random_private(_random_bytes)), _TOKEN)

    @classmethod
    def dangerously_import_private_bytes(cls, raw: bytes) -> AgreementKey:
        """Load a handle from raw X25519 private bytes (used when a dropped client's key is reconstructed).

        Args:
            raw: 32 private bytes.

        Returns:
            A handle.

        Raises:
            ValidationError: if ``raw`` is not 32 bytes.
        """
        return cls(X25519PrivateKey.from_private_bytes(_raw_private(raw, "X25519")), _TOKEN)

    def dangerously_export_private_bytes(self) -> bytes:
        """Return the raw 32 private bytes (secure aggregation secret-shares them; nothing else should)."""
        return self._key.private_bytes_raw()

    def public_bytes(self) -> bytes:
        """The 32-byte X25519 public key."""
        return self._public

    def derive(
        self, peer_public: bytes, *, info: bytes, salt: bytes | None = None, length: int = 32
    ) -> bytes:
        """Agree a secret with ``peer_public`` and expand it with HKDF-SHA256.

        Args:
            peer_public: the peer's 32-byte X25519 public key.
            info: mandatory HKDF label (purpose and parties).
            salt: optional HKDF salt (for example the round-parameter digest).
            length: output length in bytes.

        Returns:
            ``length`` derived bytes (never the raw shared secret).

        Raises:
            IntegrityError: if the peer key is invalid (for example a low-order point).
            ValidationError: on malformed arguments.
        """
        if type(peer_public) is not bytes or len(peer_public) != PUBLIC_KEY_BYTES:
            raise ValidationError(f"peer public key must be {PUBLIC_KEY_BYTES} bytes")
        try:
            shared = self._key.exchange(X25519PublicKey.from_public_bytes(peer_public))
        except ValueError:
            raise IntegrityError("key agreement failed") from None
        return hkdf_sha256(shared, info=info, salt=salt, length=length)

    def __repr__(self) -> str:
        return "AgreementKey(<redacted>)"


def verify_signature(public_key: bytes, message: bytes, signature: bytes) -> None:
    """Verify an Ed25519 signature; return nothing or raise.

    Args:
        public_key: the signer's 32-byte Ed25519 public key.
        message: the signed bytes.
        signature: the 64-byte signature.

    Raises:
        IntegrityError: if the signature does not verify (or the key/signature is malformed).
    """
    if (
        type(public_key) is not bytes
        or len(public_key) != PUBLIC_KEY_BYTES
        or type(message) is not bytes
        or type(signature) is not bytes
        or len(signature) != SIGNATURE_BYTES
    ):
        raise IntegrityError("signature verification failed")
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (InvalidSignature, ValueError):
        raise IntegrityError("signature verification failed") from None
