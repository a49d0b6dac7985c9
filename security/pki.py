"""The deployment's PKI: CA, server and device certificates, device CSRs and enrollment tokens.

Pure functions over ``cryptography``: no file I/O and no clock (every time-dependent call takes ``now``); the
aggregator does the I/O. Randomness (serial numbers, keys, tokens) comes from the OS CSPRNG.

Key types. grpcio 1.85.1 (BoringSSL) refuses Ed25519 certificates in TLS 1.3: a mutual-TLS handshake with
Ed25519 server and client certificates, or with an Ed25519 client certificate under an ECDSA CA, fails with
``NO_COMMON_SIGNATURE_ALGORITHMS``; the same handshake with ECDSA P-256 works. So every TLS key here (CA,
aggregator server, device) is **ECDSA P-256**, and each device has a **separate Ed25519 identity key** that
signs its secure-aggregation round keys. The identity key is bound to the device certificate:

* the device CSR carries the raw identity public key in a non-critical extension
  (:data:`IDENTITY_KEY_OID`) together with an Ed25519 signature (:data:`IDENTITY_PROOF_OID`) over the
  device id and the CSR's TLS public key, proving the device holds both keys;
* the issued certificate repeats the identity public key (not the proof), and enrollment registers it.

A device is named by the certificate's subject CN and a URI SAN ``fedfer://device/<id>``; both must agree
and match ``[a-z0-9-]{3,64}``. Verification functions return data or raise :class:`CertificateError`,
deliberately without saying why.
"""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import re
import secrets
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from typing import NoReturn

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedfer.security.errors import IntegrityError, ValidationError
from fedfer.security.keys import IdentityKey, load_pem_private_key, verify_signature

__all__ = [
    "DEVICE_ID_PATTERN",
    "DEVICE_URI_PREFIX",
    "IDENTITY_KEY_OID",
    "IDENTITY_PROOF_OID",
    "CertificateAuthority",
    "CertificateError",
    "DeviceCertificate",
    "DeviceCsr",
    "DeviceIdentity",
    "ServerCredentials",
    "TlsPrivateKey",
    "certificate_fingerprint",
    "certificate_serial",
    "create_device_csr",
    "device_id_from_certificate",
    "enrollment_token_hash",
    "new_enrollment_token",
    "parse_device_csr",
    "validate_device_id",
    "verify_device_certificate",
]

DEVICE_ID_PATTERN = re.compile(r"[a-z0-9-]{3,64}")
"""Allowed device ids (matched in full)."""

DEVICE_URI_PREFIX = "fedfer://device/"
"""Prefix of the URI SAN naming a device."""

# Unregistered arc 2.25 (UUID-derived OIDs, ITU-T X.667) so no enterprise number is needed.
_OID_BASE = "2.25.248155305196375418403316425478326418031"
IDENTITY_KEY_OID = x509.ObjectIdentifier(_OID_BASE + ".1")
"""Extension carrying the device's raw Ed25519 identity public key (DER OCTET STRING)."""
IDENTITY_PROOF_OID = x509.ObjectIdentifier(_OID_BASE + ".2")
"""CSR extension carrying the identity key's signature over :func:`_binding_message` (DER OCTET STRING)."""

_CLOCK_SKEW = dt.timedelta(minutes=5)
_BINDING_LABEL = b"fedfer/pki/identity-binding/v1\x00"
_TOKEN_PREFIX = "fedfer-enroll-"  # noqa: S105 (a format prefix, not a secret)
_TOKEN_RE = re.compile(r"fedfer-enroll-[A-Za-z0-9_-]{43}")
_MAX_PEM = 64 * 1024
_CREATE = object()
# What cryptography raises for structurally odd but parseable certificates and requests.
_MALFORMED = (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType)


class CertificateError(IntegrityError):
    """A certificate or signature failed verification (deliberately uninformative)."""


def _fail() -> NoReturn:
    raise CertificateError("certificate verification failed")


# -- key handles ------------------------------------------------------------------------------------------


class TlsPrivateKey:
    """Handle to an ECDSA P-256 private key used for TLS and certificate signing.

    Create with :meth:`generate` or :meth:`from_pem`. The key never appears in ``repr`` and cannot be
    pickled; :meth:`dangerously_export_pem` is the only plaintext export (callers must write it 0600).
    """

    __slots__ = ("_key",)

    def __init__(self, key: ec.EllipticCurvePrivateKey, *, _token: object = None) -> None:
        if _token is not _CREATE:
            raise TypeError("use TlsPrivateKey.generate() or TlsPrivateKey.from_pem()")
        self._key = key

    @classmethod
    def generate(cls) -> TlsPrivateKey:
        """Create a fresh P-256 key from the OS CSPRNG."""
        return cls(ec.generate_private_key(ec.SECP256R1()), _token=_CREATE)

    @classmethod
    def from_pem(cls, data: bytes) -> TlsPrivateKey:
        """Load an unencrypted PKCS#8 PEM P-256 private key.

        Raises:
            ValidationError: Not a PEM P-256 private key.
        """
        key = load_pem_private_key(data, what="TLS private key")
        if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
            raise ValidationError("TLS private key must be ECDSA P-256")
        return cls(key, _token=_CREATE)

    def public_key_der(self) -> bytes:
        """Return the SubjectPublicKeyInfo DER of the public half."""
        return self._key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def dangerously_export_pem(self) -> bytes:
        """Return the private key as UNENCRYPTED PKCS#8 PEM. Write it only to a 0600 file."""
        return self._key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def __repr__(self) -> str:
        return "TlsPrivateKey(ECDSA-P256, <redacted>)"

    def __reduce__(self) -> NoReturn:
        raise TypeError("TlsPrivateKey cannot be pickled")


# -- small helpers ----------------------------------------------------------------------------------------


def validate_device_id(device_id: object) -> str:
    """Return ``device_id`` if it matches ``[a-z0-9-]{3,64}``.

    Raises:
        ValidationError: Wrong type or format.
    """
    if type(device_id) is not str or DEVICE_ID_PATTERN.fullmatch(device_id) is None:
        raise ValidationError("device id must match [a-z0-9-]{3,64}")
    return device_id


def _check_now(now: dt.datetime) -> dt.datetime:
    if not isinstance(now, dt.datetime) or now.tzinfo is None:
        raise ValidationError("now must be a timezone-aware datetime")
    return now.astimezone(dt.UTC)


def _check_validity(validity: dt.timedelta) -> dt.timedelta:
    if not isinstance(validity, dt.timedelta) or validity <= dt.timedelta(0):
        raise ValidationError("validity must be a positive timedelta")
    return validity


def _octet_string(data: bytes) -> bytes:
    # DER OCTET STRING for the short payloads used here (32- and 64-byte values).
    return b"\x04" + bytes([len(data)]) + data


def _read_octet_string(der: bytes, size: int) -> bytes:
    if len(der) != size + 2 or der[0] != 0x04 or der[1] != size:
        raise ValidationError("malformed fedfer extension")
    return der[2:]


def _binding_message(device_id: str, tls_public_key_der: bytes) -> bytes:
    id_bytes = device_id.encode("ascii")
    return (
        _BINDING_LABEL
        + len(id_bytes).to_bytes(2, "big")
        + id_bytes
        + len(tls_public_key_der).to_bytes(4, "big")
        + tls_public_key_der
    )


def _load_certificate(data: bytes) -> x509.Certificate:
    if not isinstance(data, bytes) or len(data) > _MAX_PEM:
        _fail()
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except ValueError:
        _fail()


def _spki(public_key: ec.EllipticCurvePublicKey) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def certificate_fingerprint(certificate: bytes) -> str:
    """Return the lower-case hex SHA-256 of a certificate's DER encoding (PEM or DER accepted).

    Raises:
        CertificateError: Not a certificate.
    """
    return _load_certificate(certificate).fingerprint(hashes.SHA256()).hex()


def certificate_serial(certificate: bytes) -> int:
    """Return a certificate's serial number (PEM or DER accepted).

    Raises:
        CertificateError: Not a certificate.
    """
    return _load_certificate(certificate).serial_number


def _name(common_name: str) -> x509.Name:
    if type(common_name) is not str or not 1 <= len(common_name) <= 64:
        raise ValidationError("common name must be a string of 1 to 64 characters")
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _device_id_of(cert_or_csr: x509.Certificate | x509.CertificateSigningRequest) -> str:
    """Device id named consistently by CN and URI SAN, else ValidationError."""
    cns = cert_or_csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(cns) != 1 or not isinstance(cns[0].value, str):
        raise ValidationError("subject must have exactly one common name")
    device_id = validate_device_id(cns[0].value)
    try:
        san = cert_or_csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound as exc:
        raise ValidationError("device name lacks its fedfer URI") from exc
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if uris != [DEVICE_URI_PREFIX + device_id] or len(list(san)) != 1:
        raise ValidationError("device URI must be the only SAN and match the common name")
    return device_id


def _identity_key_of(cert_or_csr: x509.Certificate | x509.CertificateSigningRequest) -> bytes:
    try:
        ext = cert_or_csr.extensions.get_extension_for_oid(IDENTITY_KEY_OID)
    except x509.ExtensionNotFound as exc:
        raise ValidationError("identity key extension missing") from exc
    if not isinstance(ext.value, x509.UnrecognizedExtension):
        raise ValidationError("malformed identity key extension")
    key = _read_octet_string(ext.value.value, 32)
    try:
        ed25519.Ed25519PublicKey.from_public_bytes(key)
    except ValueError as exc:
        raise ValidationError("identity key is not an Ed25519 public key") from exc
    return key


# -- records ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerCredentials:
    """The aggregator's TLS server key and certificate.

    Attributes:
        private_key: Handle of the server's P-256 key.
        certificate_pem: The server certificate (PEM).
    """

    private_key: TlsPrivateKey = field(repr=False)
    certificate_pem: bytes


@dataclass(frozen=True)
class DeviceCsr:
    """A device certificate request that passed every check in :func:`parse_device_csr`.

    Attributes:
        device_id: The requested id.
        identity_public_key: Raw 32-byte Ed25519 identity public key, proven held by the device.
        tls_public_key_der: SubjectPublicKeyInfo DER of the device's P-256 TLS key.
        csr_pem: The request as received.
    """

    device_id: str
    identity_public_key: bytes = field(repr=False)
    tls_public_key_der: bytes = field(repr=False)
    csr_pem: bytes = field(repr=False)


@dataclass(frozen=True)
class DeviceCertificate:
    """A device certificate issued by the CA.

    Attributes:
        device_id: The id in CN and URI SAN.
        certificate_pem: The certificate (PEM).
        serial: Its serial number.
        fingerprint: Lower-case hex SHA-256 of its DER encoding.
        identity_public_key: Raw Ed25519 identity public key it carries.
        not_after: End of validity.
    """

    device_id: str
    certificate_pem: bytes = field(repr=False)
    serial: int
    fingerprint: str
    identity_public_key: bytes = field(repr=False)
    not_after: dt.datetime


@dataclass(frozen=True)
class DeviceIdentity:
    """What a verified device certificate establishes.

    Attributes:
        device_id: The only identity the protocol trusts.
        serial: Certificate serial number.
        fingerprint: Lower-case hex SHA-256 of the certificate DER.
        identity_public_key: Raw Ed25519 identity public key.
    """

    device_id: str
    serial: int
    fingerprint: str
    identity_public_key: bytes = field(repr=False)


# -- the CA -----------------------------------------------------------------------------------------------


class CertificateAuthority:
    """The deployment's certificate authority: a self-signed P-256 CA certificate and its key handle.

    Create with :meth:`create` or :meth:`load`. ``repr`` shows only the subject and fingerprint.
    """

    __slots__ = ("_cert", "_key")

    def __init__(self, cert: x509.Certificate, key: TlsPrivateKey, *, _token: object = None) -> None:
        if _token is not _CREATE:
            raise TypeError("use CertificateAuthority.create() or CertificateAuthority.load()")
        self._cert = cert
        self._key = key

    @classmethod
    def create(cls, *, common_name: str, now: dt.datetime, validity: dt.timedelta) -> CertificateAuthority:
        """Create a new CA valid from ``now`` (minus a small clock-skew allowance) for ``validity``.

        Raises:
            ValidationError: Bad name, naive ``now`` or non-positive validity.
        """
        now = _check_now(now)
        validity = _check_validity(validity)
        key = TlsPrivateKey.generate()
        name = _name(common_name)
        public = key._key.public_key()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _CLOCK_SKEW)
            .not_valid_after(now + validity)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .sign(key._key, hashes.SHA256())
        )
        return cls(cert, key, _token=_CREATE)

    @classmethod
    def load(cls, *, certificate_pem: bytes, private_key: TlsPrivateKey) -> CertificateAuthority:
        """Rebuild the CA from its certificate and key.

        Raises:
            ValidationError: The certificate is not a CA certificate or does not belong to ``private_key``.
        """
        try:
            cert = _load_certificate(certificate_pem)
        except CertificateError as exc:
            raise ValidationError("CA certificate is not a readable certificate") from exc
        if not isinstance(private_key, TlsPrivateKey):
            raise ValidationError("CA key must be a TlsPrivateKey")
        try:
            bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound as exc:
            raise ValidationError("CA certificate lacks basic constraints") from exc
        if not bc.ca:
            raise ValidationError("certificate is not a CA certificate")
        if _spki(private_key._key.public_key()) != cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ):
            raise ValidationError("CA key does not match the CA certificate")
        return cls(cert, private_key, _token=_CREATE)

    @property
    def certificate_pem(self) -> bytes:
        """The CA certificate (PEM), the trust anchor devices and the server pin."""
        return self._cert.public_bytes(serialization.Encoding.PEM)

    @property
    def private_key(self) -> TlsPrivateKey:
        """Handle of the CA's signing key (export only to a 0600 file)."""
        return self._key

    @property
    def fingerprint(self) -> str:
        """Lower-case hex SHA-256 of the CA certificate DER."""
        return self._cert.fingerprint(hashes.SHA256()).hex()

    @property
    def not_after(self) -> dt.datetime:
        """End of the CA certificate's validity."""
        return self._cert.not_valid_after_utc

    def __repr__(self) -> str:
        return f"CertificateAuthority(fingerprint={self.fingerprint[:16]}..., key=<redacted>)"

    def __reduce__(self) -> NoReturn:
        raise TypeError("CertificateAuthority cannot be pickled")

    def _leaf(
        self,
        *,
        subject: x509.Name,
        public_key: ec.EllipticCurvePublicKey,
        now: dt.datetime,
        validity: dt.timedelta,
        usage: x509.ObjectIdentifier,
        san: x509.SubjectAlternativeName,
        extra: Iterable[x509.ExtensionType] = (),
    ) -> x509.Certificate:
        if not self._cert.not_valid_before_utc <= now < self._cert.not_valid_after_utc:
            raise ValidationError("the CA certificate is not valid at this time")
        not_after = min(now + validity, self._cert.not_valid_after_utc)
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self._cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _CLOCK_SKEW)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(san, critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key._key.public_key()),
                critical=False,
            )
        )
        for ext in extra:
            builder = builder.add_extension(ext, critical=False)
        return builder.sign(self._key._key, hashes.SHA256())

    def issue_server_certificate(
        self,
        *,
        now: dt.datetime,
        validity: dt.timedelta,
        dns_names: Iterable[str] = (),
        ip_addresses: Iterable[str] = (),
        common_name: str = "fedfer-aggregator",
    ) -> ServerCredentials:
        """Create the aggregator's TLS key and a server certificate for it.

        The SAN always holds DNS ``localhost`` and IP ``127.0.0.1``, plus ``dns_names`` and ``ip_addresses``.
        Validity never extends past the CA's.

        Raises:
            ValidationError: A bad name or address, naive ``now`` or non-positive validity.
        """
        now = _check_now(now)
        validity = _check_validity(validity)
        general: list[x509.GeneralName] = []
        dns: list[str] = ["localhost"]
        for name in dns_names:
            if type(name) is not str or not re.fullmatch(r"[A-Za-z0-9*]([A-Za-z0-9.-]{0,252})", name):
                raise ValidationError("server DNS name is malformed")
            if name.lower() not in dns:
                dns.append(name.lower())
        ips: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [ipaddress.ip_address("127.0.0.1")]
        for text in ip_addresses:
            try:
                ip = ipaddress.ip_address(text)
            except ValueError as exc:
                raise ValidationError("server IP address is malformed") from exc
            if ip not in ips:
                ips.append(ip)
        general.extend(x509.DNSName(d) for d in dns)
        general.extend(x509.IPAddress(ip) for ip in ips)
        key = TlsPrivateKey.generate()
        cert = self._leaf(
            subject=_name(common_name),
            public_key=key._key.public_key(),
            now=now,
            validity=validity,
            usage=ExtendedKeyUsageOID.SERVER_AUTH,
            san=x509.SubjectAlternativeName(general),
        )
        return ServerCredentials(
            private_key=key, certificate_pem=cert.public_bytes(serialization.Encoding.PEM)
        )

    def issue_device_certificate(
        self, csr: DeviceCsr, *, now: dt.datetime, validity: dt.timedelta
    ) -> DeviceCertificate:
        """Issue a client certificate for a request checked by :func:`parse_device_csr`.

        Raises:
            ValidationError: ``csr`` is not a :class:`DeviceCsr`, naive ``now`` or non-positive validity.
        """
        if not isinstance(csr, DeviceCsr):
            raise ValidationError("csr must come from parse_device_csr")
        now = _check_now(now)
        validity = _check_validity(validity)
        # DeviceCsr is a plain record anyone can build: sign only what the request itself proves.
        if parse_device_csr(csr.csr_pem) != csr:
            raise ValidationError("csr fields do not match the signed request")
        public = serialization.load_der_public_key(csr.tls_public_key_der)
        if not isinstance(public, ec.EllipticCurvePublicKey):
            raise ValidationError("device TLS key must be ECDSA P-256")
        cert = self._leaf(
            subject=_name(csr.device_id),
            public_key=public,
            now=now,
            validity=validity,
            usage=ExtendedKeyUsageOID.CLIENT_AUTH,
            san=x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(DEVICE_URI_PREFIX + csr.device_id)]
            ),
            extra=[x509.UnrecognizedExtension(IDENTITY_KEY_OID, _octet_string(csr.identity_public_key))],
        )
        return DeviceCertificate(
            device_id=csr.device_id,
            certificate_pem=cert.public_bytes(serialization.Encoding.PEM),
            serial=cert.serial_number,
            fingerprint=cert.fingerprint(hashes.SHA256()).hex(),
            identity_public_key=csr.identity_public_key,
            not_after=cert.not_valid_after_utc,
        )


# -- device side: CSR -------------------------------------------------------------------------------------


def create_device_csr(*, device_id: str, tls_key: TlsPrivateKey, identity_key: IdentityKey) -> bytes:
    """Build a device's certificate request (PEM), binding its TLS key, identity key and id.

    Args:
        device_id: The id to request (``[a-z0-9-]{3,64}``).
        tls_key: The device's P-256 TLS key.
        identity_key: Its Ed25519 identity key (:class:`fedfer.security.keys.IdentityKey`).

    Raises:
        ValidationError: Bad device id or key handles.
    """
    device_id = validate_device_id(device_id)
    if not isinstance(tls_key, TlsPrivateKey) or not isinstance(identity_key, IdentityKey):
        raise ValidationError("keys must be TlsPrivateKey and IdentityKey handles")
    proof = identity_key.sign(_binding_message(device_id, tls_key.public_key_der()))
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(_name(device_id))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(DEVICE_URI_PREFIX + device_id)]),
            critical=False,
        )
        .add_extension(
            x509.UnrecognizedExtension(IDENTITY_KEY_OID, _octet_string(identity_key.public_bytes())),
            critical=False,
        )
        .add_extension(x509.UnrecognizedExtension(IDENTITY_PROOF_OID, _octet_string(proof)), critical=False)
        .sign(tls_key._key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def parse_device_csr(csr_pem: bytes) -> DeviceCsr:
    """Check a device certificate request and return what it asks for.

    Checks: PEM CSR, self-signature valid, ECDSA P-256 key, exactly one CN that is a valid device id, a URI
    SAN naming the same id and nothing else, an Ed25519 identity key and a valid identity proof.

    Raises:
        ValidationError: Malformed request, wrong key type or bad device id (the message names the problem).
        IntegrityError: The CSR signature or the identity proof does not verify.
    """
    if not isinstance(csr_pem, bytes) or len(csr_pem) > _MAX_PEM:
        raise ValidationError("certificate request must be PEM bytes of at most 64 KiB")
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as exc:
        raise ValidationError("certificate request is not a readable PEM CSR") from exc
    public = csr.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey) or not isinstance(public.curve, ec.SECP256R1):
        raise ValidationError("device TLS key must be ECDSA P-256")
    if not csr.is_signature_valid:
        raise IntegrityError("certificate request signature is invalid")
    try:
        device_id = _device_id_of(csr)
        identity = _identity_key_of(csr)
        ext = csr.extensions.get_extension_for_oid(IDENTITY_PROOF_OID)
    except x509.ExtensionNotFound as exc:
        raise ValidationError("identity proof missing") from exc
    except ValidationError:
        raise
    except _MALFORMED as exc:
        raise ValidationError("certificate request has malformed extensions") from exc
    if not isinstance(ext.value, x509.UnrecognizedExtension):
        raise ValidationError("malformed identity proof")
    proof = _read_octet_string(ext.value.value, 64)
    tls_der = _spki(public)
    try:
        verify_signature(identity, _binding_message(device_id, tls_der), proof)
    except IntegrityError as exc:
        raise IntegrityError("identity proof does not verify") from exc
    return DeviceCsr(
        device_id=device_id, identity_public_key=identity, tls_public_key_der=tls_der, csr_pem=csr_pem
    )


# -- verification -----------------------------------------------------------------------------------------


def device_id_from_certificate(certificate: bytes) -> str:
    """Extract the device id from a certificate WITHOUT checking its chain (use after TLS verified it).

    Raises:
        CertificateError: Not a certificate, or CN and URI SAN do not name one valid device id.
    """
    cert = _load_certificate(certificate)
    try:
        return _device_id_of(cert)
    except (ValidationError, *_MALFORMED):
        _fail()


def verify_device_certificate(
    certificate: bytes,
    *,
    ca_certificate_pem: bytes,
    now: dt.datetime,
    revoked_serials: Collection[int] = (),
) -> DeviceIdentity:
    """Verify a presented device certificate against the CA and return the identity it establishes.

    Checks the chain to the CA, validity at ``now``, client-auth usage, that CN and URI SAN name one valid
    device id, the identity key extension, and that the serial is not in ``revoked_serials``.

    Raises:
        CertificateError: Any check failed (deliberately uninformative).
    """
    now = _check_now(now)
    cert = _load_certificate(certificate)
    anchor = _load_certificate(ca_certificate_pem)
    try:
        verifier = (
            verification.PolicyBuilder()
            .store(verification.Store([anchor]))
            .time(now)
            .max_chain_depth(0)
            .build_client_verifier()
        )
        verifier.verify(cert, [])
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        if ExtendedKeyUsageOID.CLIENT_AUTH not in eku:
            _fail()
        device_id = _device_id_of(cert)
        identity = _identity_key_of(cert)
    except (verification.VerificationError, x509.ExtensionNotFound, ValidationError, *_MALFORMED):
        _fail()
    if cert.serial_number in revoked_serials:
        _fail()
    return DeviceIdentity(
        device_id=device_id,
        serial=cert.serial_number,
        fingerprint=cert.fingerprint(hashes.SHA256()).hex(),
        identity_public_key=identity,
    )


# -- enrollment tokens ------------------------------------------------------------------------------------


def new_enrollment_token() -> str:
    """Return a fresh one-time enrollment token (256 bits from the OS CSPRNG, URL-safe text)."""
    return _TOKEN_PREFIX + base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode("ascii")


def enrollment_token_hash(token: str) -> bytes:
    """Return the SHA-256 digest under which a token is stored (the token itself is never stored).

    A plain hash suffices: tokens carry 256 random bits, so no dictionary or brute-force attack applies.

    Raises:
        ValidationError: ``token`` does not have the token format (the message never repeats it).
    """
    if type(token) is not str or _TOKEN_RE.fullmatch(token) is None:
        raise ValidationError("enrollment token is malformed")
    h = hashes.Hash(hashes.SHA256())
    h.update(b"fedfer/enrollment-token/v1\x00" + token.encode("ascii"))
    return h.finalize()
