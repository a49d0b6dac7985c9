"""The deployment PKI: CA, server and device certificates, CSRs, verification and enrollment tokens."""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import ipaddress
import pickle

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedfer.security import keys, pki
from fedfer.security.errors import IntegrityError, ValidationError
from fedfer.security.keys import IdentityKey

NOW = dt.datetime(2026, 11, 22, 3, 0, tzinfo=dt.UTC)
DAY = dt.timedelta(days=1)


@pytest.fixture(scope="module")
def ca() -> pki.CertificateAuthority:
    return pki.CertificateAuthority.create(common_name="test CA", now=NOW, validity=365 * DAY)


@pytest.fixture(scope="module")
def other_ca() -> pki.CertificateAuthority:
    return pki.CertificateAuthority.create(common_name="test CA", now=NOW, validity=365 * DAY)


def enroll(
    ca: pki.CertificateAuthority, device_id: str = "dev-1", *, validity: dt.timedelta = 30 * DAY
) -> tuple[pki.DeviceCertificate, IdentityKey]:
    identity = IdentityKey.generate()
    csr = pki.create_device_csr(
        device_id=device_id, tls_key=pki.TlsPrivateKey.generate(), identity_key=identity
    )
    return ca.issue_device_certificate(pki.parse_device_csr(csr), now=NOW, validity=validity), identity


def hand_made_csr(
    *,
    cn: str = "dev-1",
    uri: str | None = "fedfer://device/dev-1",
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | None = None,
    identity: IdentityKey | None = None,
    proof_for: tuple[str, bytes] | None = None,
) -> bytes:
    """A CSR built without create_device_csr's own validation, to test what parse_device_csr refuses."""
    key = key if key is not None else ec.generate_private_key(ec.SECP256R1())
    identity = identity if identity is not None else IdentityKey.generate()
    spki = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    signed_id, signed_spki = proof_for if proof_for is not None else (cn, spki)
    proof = identity.sign(pki._binding_message(signed_id, signed_spki))
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    )
    if uri is not None:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=False
        )
    builder = builder.add_extension(
        x509.UnrecognizedExtension(pki.IDENTITY_KEY_OID, b"\x04\x20" + identity.public_bytes()),
        critical=False,
    ).add_extension(x509.UnrecognizedExtension(pki.IDENTITY_PROOF_OID, b"\x04\x40" + proof), critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


# -- key handles --------------------------------------------------------------------------------------------


def test_key_handles_hide_and_refuse_copying() -> None:
    tls, ident = pki.TlsPrivateKey.generate(), IdentityKey.generate()
    for handle in (tls, ident):
        assert "redacted" in repr(handle)
        assert "PRIVATE" not in repr(handle)
        for leak in (pickle.dumps, copy.copy, copy.deepcopy):
            with pytest.raises(TypeError):
                leak(handle)
    with pytest.raises(TypeError):
        pki.TlsPrivateKey(ec.generate_private_key(ec.SECP256R1()))
    assert pki.TlsPrivateKey.from_pem(tls.dangerously_export_pem()).public_key_der() == tls.public_key_der()
    assert IdentityKey.from_pem(ident.dangerously_export_pem()).public_bytes() == ident.public_bytes()
    with pytest.raises(ValidationError, match="P-256"):
        pki.TlsPrivateKey.from_pem(ident.dangerously_export_pem())
    with pytest.raises(ValidationError, match="Ed25519"):
        IdentityKey.from_pem(tls.dangerously_export_pem())
    with pytest.raises(ValidationError):
        pki.TlsPrivateKey.from_pem(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")


def test_one_identity_key_for_enrollment_and_secagg() -> None:
    # The key a device stores as PEM at enrollment is the handle secure aggregation signs with.
    assert {"IdentityKey", "verify_identity_signature"}.isdisjoint(pki.__all__)
    assert pki.IdentityKey is keys.IdentityKey and pki.verify_signature is keys.verify_signature
    ident = keys.IdentityKey.from_pem(keys.IdentityKey.generate().dangerously_export_pem())
    keys.verify_signature(ident.public_bytes(), b"m", ident.sign(b"m"))
    csr = pki.create_device_csr(device_id="dev-7", tls_key=pki.TlsPrivateKey.generate(), identity_key=ident)
    assert pki.parse_device_csr(csr).identity_public_key == ident.public_bytes()


# -- CA and server certificate ------------------------------------------------------------------------------


def test_ca_round_trip_and_refusals(ca: pki.CertificateAuthority, other_ca: pki.CertificateAuthority) -> None:
    assert len(ca.fingerprint) == 64 and ca.fingerprint != other_ca.fingerprint
    assert "redacted" in repr(ca) and "PRIVATE" not in repr(ca)
    assert ca.not_after == NOW + 365 * DAY
    with pytest.raises(TypeError):
        pickle.dumps(ca)
    loaded = pki.CertificateAuthority.load(certificate_pem=ca.certificate_pem, private_key=ca.private_key)
    assert loaded.fingerprint == ca.fingerprint
    with pytest.raises(ValidationError, match="does not match"):
        pki.CertificateAuthority.load(certificate_pem=ca.certificate_pem, private_key=other_ca.private_key)
    server = ca.issue_server_certificate(now=NOW, validity=DAY)
    with pytest.raises(ValidationError, match="not a CA"):
        pki.CertificateAuthority.load(certificate_pem=server.certificate_pem, private_key=server.private_key)
    with pytest.raises(ValidationError, match="timezone"):
        pki.CertificateAuthority.create(common_name="x", now=dt.datetime(2026, 1, 1), validity=DAY)
    with pytest.raises(ValidationError, match="validity"):
        pki.CertificateAuthority.create(common_name="x", now=NOW, validity=-DAY)
    cert = x509.load_pem_x509_certificate(ca.certificate_pem)
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)


def test_server_certificate_names(ca: pki.CertificateAuthority) -> None:
    server = ca.issue_server_certificate(
        now=NOW,
        validity=10_000 * DAY,
        dns_names=["agg.example.org", "localhost"],
        ip_addresses=["10.0.0.5", "::1"],
    )
    cert = x509.load_pem_x509_certificate(server.certificate_pem)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "agg.example.org"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("10.0.0.5"),
        ipaddress.ip_address("::1"),
    ]
    assert (
        ExtendedKeyUsageOID.SERVER_AUTH
        in cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    )
    assert cert.not_valid_after_utc == ca.not_after  # capped by the CA
    assert "redacted" in repr(server.private_key)
    with pytest.raises(ValidationError):
        ca.issue_server_certificate(now=NOW, validity=DAY, dns_names=["bad name!"])
    with pytest.raises(ValidationError):
        ca.issue_server_certificate(now=NOW, validity=DAY, ip_addresses=["300.1.1.1"])


# -- CSRs ---------------------------------------------------------------------------------------------------


def test_csr_binds_id_tls_key_and_identity_key() -> None:
    tls, ident = pki.TlsPrivateKey.generate(), IdentityKey.generate()
    req = pki.parse_device_csr(pki.create_device_csr(device_id="dev-01", tls_key=tls, identity_key=ident))
    assert req.device_id == "dev-01"
    assert req.identity_public_key == ident.public_bytes()
    assert req.tls_public_key_der == tls.public_key_der()
    assert "identity_public_key" not in repr(req)


@pytest.mark.parametrize("bad", ["AB-1", "ab", "x" * 65, "dev_1", "dév-1", "dev 1", ""])
def test_create_csr_refuses_bad_device_ids(bad: str) -> None:
    with pytest.raises(ValidationError, match="device id"):
        pki.create_device_csr(
            device_id=bad, tls_key=pki.TlsPrivateKey.generate(), identity_key=IdentityKey.generate()
        )


@pytest.mark.parametrize("bad", ["AB-1", "ab", "dev_1", "dev.1"])  # x509 itself refuses CNs over 64 chars
def test_parse_csr_refuses_bad_device_ids(bad: str) -> None:
    with pytest.raises(ValidationError, match="device id"):
        pki.parse_device_csr(hand_made_csr(cn=bad, uri=f"fedfer://device/{bad}"))


def test_parse_csr_refuses_malformed_requests() -> None:
    assert pki.parse_device_csr(hand_made_csr()).device_id == "dev-1"  # the helper itself makes valid CSRs
    with pytest.raises(ValidationError, match="URI"):
        pki.parse_device_csr(hand_made_csr(uri="fedfer://device/dev-2"))
    with pytest.raises(ValidationError, match="URI"):
        pki.parse_device_csr(hand_made_csr(uri=None))
    with pytest.raises(ValidationError, match="P-256"):
        pki.parse_device_csr(
            hand_made_csr(key=rsa.generate_private_key(public_exponent=65537, key_size=2048))
        )
    with pytest.raises(ValidationError, match="P-256"):
        pki.parse_device_csr(hand_made_csr(key=ec.generate_private_key(ec.SECP384R1())))
    with pytest.raises(ValidationError):
        pki.parse_device_csr(b"not a csr")
    with pytest.raises(ValidationError):
        pki.parse_device_csr(b"x" * 100_000)
    with pytest.raises(ValidationError):
        pki.parse_device_csr("text")  # type: ignore[arg-type]


def test_parse_csr_refuses_forged_proofs_and_signatures() -> None:
    # Identity proof made for another device id, or for another TLS key: the identity key holder never
    # agreed to this binding.
    with pytest.raises(IntegrityError, match="identity proof"):
        pki.parse_device_csr(hand_made_csr(proof_for=("dev-2", b"")))
    other = ec.generate_private_key(ec.SECP256R1()).public_key()
    other_spki = other.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with pytest.raises(IntegrityError, match="identity proof"):
        pki.parse_device_csr(hand_made_csr(proof_for=("dev-1", other_spki)))
    # A CSR whose self-signature was damaged.
    der = bytearray(x509.load_pem_x509_csr(hand_made_csr()).public_bytes(serialization.Encoding.DER))
    der[-5] ^= 0x01
    damaged = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(IntegrityError, match="signature"):
        pki.parse_device_csr(damaged)


# -- device certificates ------------------------------------------------------------------------------------


def test_issue_and_verify_device_certificate(ca: pki.CertificateAuthority) -> None:
    cert, ident = enroll(ca, "dev-42")
    assert cert.device_id == "dev-42" and cert.not_after == NOW + 30 * DAY
    assert pki.certificate_fingerprint(cert.certificate_pem) == cert.fingerprint
    assert pki.certificate_serial(cert.certificate_pem) == cert.serial and cert.serial > 2**64
    assert pki.device_id_from_certificate(cert.certificate_pem) == "dev-42"
    got = pki.verify_device_certificate(
        cert.certificate_pem, ca_certificate_pem=ca.certificate_pem, now=NOW + DAY
    )
    assert got == pki.DeviceIdentity(
        device_id="dev-42",
        serial=cert.serial,
        fingerprint=cert.fingerprint,
        identity_public_key=ident.public_bytes(),
    )
    der = x509.load_pem_x509_certificate(cert.certificate_pem).public_bytes(serialization.Encoding.DER)
    assert (
        pki.verify_device_certificate(der, ca_certificate_pem=ca.certificate_pem, now=NOW).device_id
        == "dev-42"
    )
    parsed = x509.load_pem_x509_certificate(cert.certificate_pem)
    eku = parsed.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.CLIENT_AUTH in eku and ExtendedKeyUsageOID.SERVER_AUTH not in eku
    assert parsed.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "dev-42"


def test_wrong_ca_is_rejected(ca: pki.CertificateAuthority, other_ca: pki.CertificateAuthority) -> None:
    cert, _ = enroll(other_ca)  # same CA name, different key
    with pytest.raises(pki.CertificateError):
        pki.verify_device_certificate(cert.certificate_pem, ca_certificate_pem=ca.certificate_pem, now=NOW)


def test_expired_and_not_yet_valid_are_rejected(ca: pki.CertificateAuthority) -> None:
    cert, _ = enroll(ca, validity=DAY)
    ok = pki.verify_device_certificate(cert.certificate_pem, ca_certificate_pem=ca.certificate_pem, now=NOW)
    assert ok.device_id == "dev-1"
    for when in (NOW + 2 * DAY, NOW - DAY):
        with pytest.raises(pki.CertificateError):
            pki.verify_device_certificate(
                cert.certificate_pem, ca_certificate_pem=ca.certificate_pem, now=when
            )


def test_revoked_serial_is_rejected(ca: pki.CertificateAuthority) -> None:
    cert, _ = enroll(ca)
    with pytest.raises(pki.CertificateError):
        pki.verify_device_certificate(
            cert.certificate_pem,
            ca_certificate_pem=ca.certificate_pem,
            now=NOW,
            revoked_serials={cert.serial, 5},
        )
    assert (
        pki.verify_device_certificate(
            cert.certificate_pem, ca_certificate_pem=ca.certificate_pem, now=NOW, revoked_serials={5}
        ).serial
        == cert.serial
    )


def test_non_device_certificates_are_rejected(ca: pki.CertificateAuthority) -> None:
    server = ca.issue_server_certificate(now=NOW, validity=DAY)
    for pem in (server.certificate_pem, ca.certificate_pem, b"garbage", b""):
        with pytest.raises(pki.CertificateError):
            pki.verify_device_certificate(pem, ca_certificate_pem=ca.certificate_pem, now=NOW)
    with pytest.raises(pki.CertificateError):
        pki.device_id_from_certificate(server.certificate_pem)
    with pytest.raises(pki.CertificateError):
        pki.certificate_fingerprint(b"not a certificate")


def test_certificate_tampering_is_rejected(ca: pki.CertificateAuthority) -> None:
    cert, ident = enroll(ca)
    der = bytearray(
        x509.load_pem_x509_certificate(cert.certificate_pem).public_bytes(serialization.Encoding.DER)
    )
    # Flip one bit of the identity key inside the signed body: everything still parses, only the CA's
    # signature no longer matches (an attacker swapping in their own identity key).
    idx = der.find(ident.public_bytes())
    assert idx > 0
    der[idx] ^= 0x01
    tampered = x509.load_der_x509_certificate(bytes(der))
    assert pki.device_id_from_certificate(bytes(der)) == "dev-1"
    assert tampered.serial_number == cert.serial
    with pytest.raises(pki.CertificateError):
        pki.verify_device_certificate(bytes(der), ca_certificate_pem=ca.certificate_pem, now=NOW)


def test_cert_issued_by_ca_copies_only_checked_data(ca: pki.CertificateAuthority) -> None:
    with pytest.raises(ValidationError):
        ca.issue_device_certificate(pki.parse_device_csr, now=NOW, validity=DAY)  # type: ignore[arg-type]
    cert, _ = enroll(ca, validity=10_000 * DAY)
    assert cert.not_after == ca.not_after
    # A hand-built request record claiming another id than the signed CSR is refused.
    real = pki.parse_device_csr(hand_made_csr())
    forged = dataclasses.replace(real, device_id="admin-1")
    with pytest.raises(ValidationError, match="do not match"):
        ca.issue_device_certificate(forged, now=NOW, validity=DAY)
    # An expired (or not yet valid) CA signs nothing.
    for when in (NOW + 366 * DAY, NOW - DAY):
        with pytest.raises(ValidationError, match="CA certificate is not valid"):
            ca.issue_device_certificate(real, now=when, validity=DAY)


@pytest.mark.parametrize(
    "value",
    [b"", b"\x04\x1f" + bytes(31), b"\x04\x20" + bytes(31), b"\x03\x20" + bytes(32), b"\x04\x21" + bytes(33)],
)
def test_malformed_identity_extension_is_refused(value: bytes) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    pem = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dev-1")]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier("fedfer://device/dev-1")]),
            critical=False,
        )
        .add_extension(x509.UnrecognizedExtension(pki.IDENTITY_KEY_OID, value), critical=False)
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )
    with pytest.raises(ValidationError):
        pki.parse_device_csr(pem)


# -- tokens -------------------------------------------------------------------------------------------------


def test_enrollment_tokens() -> None:
    tokens = {pki.new_enrollment_token() for _ in range(50)}
    assert len(tokens) == 50
    token = next(iter(tokens))
    assert token.startswith("fedfer-enroll-") and len(token) == len("fedfer-enroll-") + 43
    digest = pki.enrollment_token_hash(token)
    assert len(digest) == 32 and digest == pki.enrollment_token_hash(token)
    assert digest != pki.enrollment_token_hash(next(t for t in tokens if t != token))
    for bad in ("", "fedfer-enroll-short", token + "x", token.upper(), 5):
        with pytest.raises(ValidationError) as info:
            pki.enrollment_token_hash(bad)  # type: ignore[arg-type]
        assert token not in str(info.value)


def test_records_do_not_copy_keys_into_repr(ca: pki.CertificateAuthority) -> None:
    cert, _ = enroll(ca)
    text = repr(cert)
    assert "BEGIN CERTIFICATE" not in text and "identity_public_key" not in text
    assert copy.copy(cert) == cert
