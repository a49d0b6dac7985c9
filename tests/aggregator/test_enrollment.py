"""Enrollment with one-time tokens, device authentication and revocation, on both storage backends."""

from __future__ import annotations

import base64
import datetime as dt
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedfer.aggregator.enrollment import (
    AuthenticationError,
    EnrollmentResult,
    EnrollmentService,
    TokenRejectedError,
    issue_token,
)
from fedfer.aggregator.storage import NotFoundError, Storage, open_storage
from fedfer.security import pki
from fedfer.security.errors import IntegrityError, ValidationError
from fedfer.security.keys import IdentityKey

DAY = dt.timedelta(days=1)
START = dt.datetime(2026, 11, 22, 3, 0, tzinfo=dt.UTC)


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> dt.datetime:
        return self.now


@pytest.fixture(scope="module")
def ca() -> pki.CertificateAuthority:
    return pki.CertificateAuthority.create(common_name="enroll CA", now=START, validity=365 * DAY)


@pytest.fixture
def store(storage_url: str) -> Iterator[Storage]:
    with open_storage(storage_url, now=START, create=True) as storage:
        yield storage


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def service(store: Storage, ca: pki.CertificateAuthority, clock: Clock) -> EnrollmentService:
    return EnrollmentService(storage=store, ca=ca, certificate_validity=30 * DAY, clock=clock)


def csr(device_id: str) -> tuple[bytes, IdentityKey]:
    identity = IdentityKey.generate()
    return pki.create_device_csr(
        device_id=device_id, tls_key=pki.TlsPrivateKey.generate(), identity_key=identity
    ), identity


def flip_last_signature_byte(pem: bytes) -> bytes:
    """Damage a PEM CSR's signature (its last DER byte) while keeping it parseable."""
    lines = pem.strip().split(b"\n")
    der = bytearray(base64.b64decode(b"".join(lines[1:-1])))
    der[-1] ^= 0x01
    body = base64.encodebytes(bytes(der)).replace(b"\n", b"")
    chunks = [body[i : i + 64] for i in range(0, len(body), 64)]
    return b"\n".join([lines[0], *chunks, lines[-1]]) + b"\n"


def test_enroll_registers_device_and_authenticates(service: EnrollmentService, store: Storage) -> None:
    issued = service.create_token(label="lab phone")
    assert issued.token not in repr(issued) and issued.expires_at == START + DAY
    request, identity = csr("phone-01")
    result = service.enroll(token=issued.token, csr_pem=request)
    assert isinstance(result, EnrollmentResult)
    assert result.ca_certificate_pem == service.ca_certificate_pem
    device = store.get_device("phone-01")
    assert device == result.device
    assert device is not None and device.identity_public_key == identity.public_bytes()
    assert device.cert_fingerprint == pki.certificate_fingerprint(result.certificate_pem)
    assert device.cert_serial == pki.certificate_serial(result.certificate_pem)
    assert service.authenticate(result.certificate_pem) == device
    token = store.get_token(pki.enrollment_token_hash(issued.token))
    assert token is not None and token.device_id == "phone-01" and token.label == "lab phone"


def test_token_is_stored_only_as_hash(tmp_path: Path, ca: pki.CertificateAuthority) -> None:
    path = tmp_path / "agg.db"
    with open_storage(f"sqlite://{path}", now=START, create=True) as store:
        issued = issue_token(store, now=START, label="x")
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir())
    assert issued.token.encode() not in raw
    assert pki.enrollment_token_hash(issued.token) in raw


def test_second_use_of_a_token_is_refused(service: EnrollmentService, store: Storage) -> None:
    token = service.create_token().token
    service.enroll(token=token, csr_pem=csr("dev-1")[0])
    with pytest.raises(TokenRejectedError):
        service.enroll(token=token, csr_pem=csr("dev-2")[0])
    assert store.get_device("dev-2") is None


def test_expired_unknown_and_malformed_tokens_are_refused(
    service: EnrollmentService, store: Storage, clock: Clock
) -> None:
    token = service.create_token(ttl=dt.timedelta(minutes=5)).token
    clock.now = START + dt.timedelta(minutes=5)
    for bad in (token, pki.new_enrollment_token(), "not-a-token", ""):
        with pytest.raises(TokenRejectedError) as info:
            service.enroll(token=bad, csr_pem=csr("dev-1")[0])
        assert str(info.value) == "enrollment token is invalid, expired or already used"
    assert store.list_devices() == []
    with pytest.raises(ValidationError):
        service.create_token(ttl=dt.timedelta(days=91))
    with pytest.raises(ValidationError):
        service.create_token(ttl=-DAY)


def test_malformed_requests_leave_the_token_usable(service: EnrollmentService, store: Storage) -> None:
    token = service.create_token().token
    with pytest.raises(ValidationError):
        service.enroll(token=token, csr_pem=b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n")
    good, _ = csr("dev-2")
    with pytest.raises(IntegrityError):
        service.enroll(token=token, csr_pem=flip_last_signature_byte(good))
    result = service.enroll(token=token, csr_pem=good)
    assert result.device.device_id == "dev-2"


def test_a_taken_device_id_is_refused_like_a_bad_token_and_spends_the_token(
    service: EnrollmentService, store: Storage
) -> None:
    service.enroll(token=service.create_token().token, csr_pem=csr("dev-1")[0])
    token = service.create_token().token
    with pytest.raises(TokenRejectedError) as taken:
        service.enroll(token=token, csr_pem=csr("dev-1")[0])
    with pytest.raises(TokenRejectedError) as bad:
        service.enroll(token=pki.new_enrollment_token(), csr_pem=csr("dev-3")[0])
    assert str(taken.value) == str(bad.value)  # the caller cannot tell "id taken" from "token unusable"
    # The token is spent: its holder cannot go on testing ids, not even a free one.
    spent = store.get_token(pki.enrollment_token_hash(token))
    assert spent is not None and spent.used_at is not None and spent.device_id is None
    with pytest.raises(TokenRejectedError):
        service.enroll(token=token, csr_pem=csr("dev-4")[0])
    assert [d.device_id for d in store.list_devices()] == ["dev-1"]


def test_racing_enrollments_with_one_token_have_one_winner(
    storage_url: str, ca: pki.CertificateAuthority
) -> None:
    n = 5
    stores = [open_storage(storage_url, now=START, create=True) for _ in range(n)]
    try:
        services = [EnrollmentService(storage=s, ca=ca) for s in stores]
        token = services[0].create_token().token
        requests = [csr(f"dev-{i}")[0] for i in range(n)]
        barrier = threading.Barrier(n)
        outcomes: list[object] = [None] * n

        def attempt(i: int) -> None:
            barrier.wait()
            try:
                outcomes[i] = services[i].enroll(token=token, csr_pem=requests[i])
            except TokenRejectedError as exc:
                outcomes[i] = exc

        threads = [threading.Thread(target=attempt, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        winners = [o for o in outcomes if isinstance(o, EnrollmentResult)]
        assert len(winners) == 1 and sum(isinstance(o, TokenRejectedError) for o in outcomes) == n - 1
        assert [d.device_id for d in stores[0].list_devices()] == [winners[0].device.device_id]
    finally:
        for s in stores:
            s.close()


def test_revocation(service: EnrollmentService, store: Storage, clock: Clock) -> None:
    a = service.enroll(token=service.create_token().token, csr_pem=csr("dev-a")[0])
    b = service.enroll(token=service.create_token().token, csr_pem=csr("dev-b")[0])
    clock.now = START + DAY
    revoked = service.revoke("dev-a")
    assert revoked.revoked and revoked.revoked_at == START + DAY
    with pytest.raises(AuthenticationError):
        service.authenticate(a.certificate_pem)
    assert service.authenticate(b.certificate_pem).device_id == "dev-b"
    assert store.revoked_serials() == {a.device.cert_serial}
    with pytest.raises(NotFoundError):
        service.revoke("dev-zzz")
    with pytest.raises(ValidationError):
        service.revoke("Not An Id")
    # A revoked id stays taken: it cannot be re-enrolled under a new certificate.
    with pytest.raises(TokenRejectedError):
        service.enroll(token=service.create_token().token, csr_pem=csr("dev-a")[0])


def test_authenticate_refuses_foreign_expired_and_unregistered_certificates(
    service: EnrollmentService, ca: pki.CertificateAuthority, clock: Clock
) -> None:
    ok = service.enroll(token=service.create_token().token, csr_pem=csr("dev-1")[0])
    foreign = pki.CertificateAuthority.create(common_name="enroll CA", now=START, validity=DAY)
    foreign_cert = foreign.issue_device_certificate(
        pki.parse_device_csr(csr("dev-1")[0]), now=START, validity=DAY
    )
    # Issued by the right CA for a registered id, but not the registered certificate (a device claiming
    # another's id with a certificate obtained elsewhere).
    stray = ca.issue_device_certificate(pki.parse_device_csr(csr("dev-1")[0]), now=START, validity=DAY)
    unknown = ca.issue_device_certificate(pki.parse_device_csr(csr("dev-9")[0]), now=START, validity=DAY)
    for pem in (foreign_cert.certificate_pem, stray.certificate_pem, unknown.certificate_pem, b"junk"):
        with pytest.raises(AuthenticationError) as info:
            service.authenticate(pem)
        assert str(info.value) == "client certificate is not acceptable"
    clock.now = START + 31 * DAY
    with pytest.raises(AuthenticationError):
        service.authenticate(ok.certificate_pem)


def test_service_checks_its_arguments(store: Storage, ca: pki.CertificateAuthority) -> None:
    with pytest.raises(ValidationError):
        EnrollmentService(storage="db", ca=ca)  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        EnrollmentService(storage=store, ca=ca, certificate_validity=dt.timedelta(0))
    text = repr(EnrollmentService(storage=store, ca=ca))
    assert ca.fingerprint[:16] in text and "PRIVATE" not in text
