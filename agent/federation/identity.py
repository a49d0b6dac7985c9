"""Bridge the device's stored identity key (PKCS#8 PEM, as enrolled) to a secure-aggregation handle.

Enrollment (``security.pki``) stores the Ed25519 identity key as unencrypted PKCS#8 PEM in a 0600 file; the
secure-aggregation client (``security.secagg``) signs with a ``security.keys.IdentityKey`` handle. An Ed25519
PKCS#8 document is a fixed 16-byte DER header followed by the 32-byte private key (RFC 8410), so the raw key
is read by checking that header: no cryptographic operation happens here.
"""

from __future__ import annotations

import base64
import binascii

from security.errors import ValidationError
from security.keys import IdentityKey

__all__ = ["secagg_identity_from_pem"]

_ED25519_PKCS8_HEADER = bytes.fromhex("302e020100300506032b657004220420")
_BEGIN = b"-----BEGIN PRIVATE KEY-----"
_END = b"-----END PRIVATE KEY-----"


def secagg_identity_from_pem(pem: bytes) -> IdentityKey:
    """Return the secure-aggregation identity handle of an unencrypted Ed25519 PKCS#8 PEM key.

    Raises:
        ValidationError: not an unencrypted Ed25519 PKCS#8 PEM private key (never echoes key bytes).
    """
    text = pem.strip()
    if not text.startswith(_BEGIN) or not text.endswith(_END):
        raise ValidationError("identity key is not a PKCS#8 PEM private key")
    try:
        der = base64.b64decode(b"".join(text[len(_BEGIN) : -len(_END)].split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValidationError("identity key PEM is not valid base64") from exc
    if len(der) != len(_ED25519_PKCS8_HEADER) + 32 or not der.startswith(_ED25519_PKCS8_HEADER):
        raise ValidationError("identity key is not an Ed25519 PKCS#8 key")
    return IdentityKey.from_private_bytes_DANGEROUS(der[len(_ED25519_PKCS8_HEADER) :])
