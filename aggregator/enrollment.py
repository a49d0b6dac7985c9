"""Device enrollment and authentication over the storage interface (no gRPC here).

* :func:`issue_token` creates a one-time token: 256 random bits, returned once, stored only as a hash, with
  an expiry. :meth:`EnrollmentService.enroll` consumes it atomically together with registering the device,
  so a second use is refused and two racing uses have exactly one winner.
* :meth:`EnrollmentService.enroll` checks the CSR (signature, ECDSA P-256 key, device id format, identity-key
  proof), issues the device certificate from the deployment CA and registers id, certificate fingerprint,
  serial and Ed25519 identity public key. The device picks its id; one that is already registered is refused
  with the same answer as an unusable token, and spends the token: a token holder cannot probe which device
  ids exist (one guess per token at most), while a malformed request leaves the token usable.
* :meth:`EnrollmentService.authenticate` turns a TLS peer certificate into the registered device, refusing
  certificates not issued by the CA, expired, unknown, revoked, or not the one registered for that id.

Errors carry sanitized messages meant to be shown to the remote party.
"""

from __future__ import annotations

import datetime as dt
import hmac
from collections.abc import Callable
from dataclasses import dataclass, field

from fedfer.aggregator.storage.base import ConflictError, DeviceRecord, Storage, TokenRecord
from fedfer.security.errors import FedferError, ValidationError
from fedfer.security.pki import (
    CertificateAuthority,
    CertificateError,
    enrollment_token_hash,
    new_enrollment_token,
    parse_device_csr,
    validate_device_id,
    verify_device_certificate,
)

__all__ = [
    "AuthenticationError",
    "EnrollmentError",
    "EnrollmentResult",
    "EnrollmentService",
    "IssuedToken",
    "TokenRejectedError",
    "issue_token",
]

DEFAULT_TOKEN_TTL = dt.timedelta(hours=24)
DEFAULT_CERTIFICATE_VALIDITY = dt.timedelta(days=365)
_MAX_TOKEN_TTL = dt.timedelta(days=90)
_REFUSED = "enrollment token is invalid, expired or already used"


def _utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class EnrollmentError(FedferError):
    """Enrollment was refused."""


class TokenRejectedError(EnrollmentError):
    """Enrollment refused: the token is malformed, unknown, expired or already used, or the device id is
    taken (deliberately not told apart)."""


class AuthenticationError(FedferError):
    """A peer certificate does not identify a registered device in good standing."""


@dataclass(frozen=True)
class IssuedToken:
    """A freshly created enrollment token. ``token`` is secret: hand it to one device, never log it.

    Attributes:
        token: The token text (shown once; storage keeps only its hash).
        expires_at: After this instant it is refused.
        label: Operator's note.
    """

    token: str = field(repr=False)
    expires_at: dt.datetime
    label: str


@dataclass(frozen=True)
class EnrollmentResult:
    """What a device receives after enrolling.

    Attributes:
        device: The registered device.
        certificate_pem: The device's client certificate.
        ca_certificate_pem: The CA certificate to trust for the aggregator's server certificate.
    """

    device: DeviceRecord
    certificate_pem: bytes = field(repr=False)
    ca_certificate_pem: bytes = field(repr=False)


def issue_token(
    storage: Storage, *, now: dt.datetime, ttl: dt.timedelta = DEFAULT_TOKEN_TTL, label: str = ""
) -> IssuedToken:
    """Create, store (hashed) and return a one-time enrollment token.

    Raises:
        ValidationError: ``ttl`` outside (0, 90 days] or a label longer than 200 characters.
    """
    if not isinstance(ttl, dt.timedelta) or not dt.timedelta(0) < ttl <= _MAX_TOKEN_TTL:
        raise ValidationError("token ttl must be positive and at most 90 days")
    if type(label) is not str or len(label) > 200:
        raise ValidationError("token label must be a string of at most 200 characters")
    token = new_enrollment_token()
    record = TokenRecord(
        token_hash=enrollment_token_hash(token), created_at=now, expires_at=now + ttl, label=label
    )
    storage.add_token(record)
    return IssuedToken(token=token, expires_at=record.expires_at, label=label)


class EnrollmentService:
    """Enroll, authenticate and revoke devices.

    Args:
        storage: Device and token store.
        ca: The deployment's certificate authority (with its key).
        certificate_validity: Lifetime of issued device certificates (capped by the CA's own).
        clock: Returns the current UTC time (a seam for tests).
    """

    def __init__(
        self,
        *,
        storage: Storage,
        ca: CertificateAuthority,
        certificate_validity: dt.timedelta = DEFAULT_CERTIFICATE_VALIDITY,
        clock: Callable[[], dt.datetime] = _utc_now,
    ) -> None:
        if not isinstance(storage, Storage):
            raise ValidationError("storage must be a Storage")
        if not isinstance(ca, CertificateAuthority):
            raise ValidationError("ca must be a CertificateAuthority")
        if not isinstance(certificate_validity, dt.timedelta) or certificate_validity <= dt.timedelta(0):
            raise ValidationError("certificate_validity must be a positive timedelta")
        if not callable(clock):
            raise ValidationError("clock must be callable")
        self._storage = storage
        self._ca = ca
        self._validity = certificate_validity
        self._clock = clock

    def __repr__(self) -> str:
        return f"EnrollmentService(ca={self._ca.fingerprint[:16]}...)"

    @property
    def ca_certificate_pem(self) -> bytes:
        """The CA certificate devices trust."""
        return self._ca.certificate_pem

    def create_token(self, *, ttl: dt.timedelta = DEFAULT_TOKEN_TTL, label: str = "") -> IssuedToken:
        """Create a one-time enrollment token (see :func:`issue_token`)."""
        return issue_token(self._storage, now=self._clock(), ttl=ttl, label=label)

    def enroll(self, *, token: str, csr_pem: bytes) -> EnrollmentResult:
        """Consume ``token``, check ``csr_pem``, issue a certificate and register the device.

        A malformed request leaves the token usable. A device id that is already registered spends it and is
        refused like a bad token, so one token can test at most one id.

        Raises:
            TokenRejectedError: Token malformed, unknown, expired or used, or the device id is taken.
            ValidationError: Malformed CSR, wrong key type or bad device id.
            IntegrityError: CSR signature or identity proof invalid.
        """
        now = self._clock()
        try:
            token_hash = enrollment_token_hash(token)
        except ValidationError:
            raise TokenRejectedError(_REFUSED) from None
        request = parse_device_csr(csr_pem)
        if not self._token_usable(token_hash, now):
            raise TokenRejectedError(_REFUSED)
        if self._storage.get_device(request.device_id) is not None:
            self._storage.spend_token(token_hash, now=now)
            raise TokenRejectedError(_REFUSED)
        cert = self._ca.issue_device_certificate(request, now=now, validity=self._validity)
        device = DeviceRecord(
            device_id=cert.device_id,
            cert_fingerprint=cert.fingerprint,
            cert_serial=cert.serial,
            identity_public_key=cert.identity_public_key,
            created_at=now,
        )
        try:
            self._storage.enroll_device(token_hash=token_hash, device=device, now=now)
        except ConflictError:
            # Lost a race: the token was used meanwhile, or the id was registered meanwhile (spend it then).
            self._storage.spend_token(token_hash, now=now)
            raise TokenRejectedError(_REFUSED) from None
        return EnrollmentResult(
            device=device, certificate_pem=cert.certificate_pem, ca_certificate_pem=self._ca.certificate_pem
        )

    def _token_usable(self, token_hash: bytes, now: dt.datetime) -> bool:
        record = self._storage.get_token(token_hash)
        return record is not None and record.used_at is None and record.expires_at > now

    def authenticate(self, peer_certificate: bytes) -> DeviceRecord:
        """Return the registered device a TLS peer certificate (PEM or DER) identifies.

        Raises:
            AuthenticationError: Not issued by this CA, not valid now, unknown device, revoked, or not the
                certificate registered for that device.
        """
        try:
            identity = verify_device_certificate(
                peer_certificate, ca_certificate_pem=self._ca.certificate_pem, now=self._clock()
            )
        except CertificateError:
            raise AuthenticationError("client certificate is not acceptable") from None
        device = self._storage.get_device(identity.device_id)
        if (
            device is None
            or device.revoked
            or not hmac.compare_digest(device.cert_fingerprint, identity.fingerprint)
            or device.cert_serial != identity.serial
        ):
            raise AuthenticationError("client certificate is not acceptable")
        return device

    def revoke(self, device_id: str) -> DeviceRecord:
        """Revoke a device: its certificate is refused from now on (idempotent).

        Raises:
            ValidationError: Malformed device id.
            NotFoundError: No such device.
        """
        return self._storage.revoke_device(validate_device_id(device_id), now=self._clock())
