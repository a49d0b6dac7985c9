"""The PKI's certificates in a real grpcio TLS 1.3 mutual-TLS handshake over loopback.

This is the experiment behind the key-type choice in ``security/pki.py``: ECDSA P-256 certificates on both
sides complete the handshake, an Ed25519 client certificate does not (BoringSSL in grpcio offers no Ed25519
signature algorithm), so device identity keys are separate Ed25519 keys bound through the certificate. The
peer certificate gRPC hands the servicer is what :meth:`EnrollmentService.authenticate` turns into a device.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedfer.aggregator.enrollment import AuthenticationError, EnrollmentService
from fedfer.aggregator.storage import open_storage
from fedfer.security import pki
from fedfer.security.keys import IdentityKey

NOW = dt.datetime.now(dt.UTC)
DAY = dt.timedelta(days=1)
METHOD = "/fedfer.test.Who/Am"


def new_device(ca: pki.CertificateAuthority, name: str = "dev-1") -> tuple[bytes, bytes]:
    tls = pki.TlsPrivateKey.generate()
    csr = pki.create_device_csr(device_id=name, tls_key=tls, identity_key=IdentityKey.generate())
    cert = ca.issue_device_certificate(pki.parse_device_csr(csr), now=NOW, validity=DAY)
    return tls.dangerously_export_pem(), cert.certificate_pem


def ed25519_device(ca: pki.CertificateAuthority) -> tuple[bytes, bytes]:
    """A client certificate with an Ed25519 key, signed by our CA (only used to show grpcio refuses it)."""
    key = ed25519.Ed25519PrivateKey.generate()
    ca_cert = x509.load_pem_x509_certificate(ca.certificate_pem)
    ca_key = serialization.load_pem_private_key(ca.private_key.dangerously_export_pem(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dev-ed")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - DAY)
        .not_valid_after(NOW + DAY)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)


async def serve_and_call(
    ca: pki.CertificateAuthority,
    handler: Callable[[bytes, grpc.aio.ServicerContext[Any, Any]], Awaitable[bytes]],
    calls: list[tuple[str, grpc.ChannelCredentials | None]],
) -> list[bytes | grpc.StatusCode]:
    """Start a mutual-TLS server with one raw-bytes method, make each call, return replies or status codes."""
    server_creds = ca.issue_server_certificate(now=NOW, validity=DAY)
    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "fedfer.test.Who", {"Am": grpc.unary_unary_rpc_method_handler(handler)}
            )
        ]
    )
    port = server.add_secure_port(
        "127.0.0.1:0",
        grpc.ssl_server_credentials(
            [(server_creds.private_key.dangerously_export_pem(), server_creds.certificate_pem)],
            root_certificates=ca.certificate_pem,
            require_client_auth=True,
        ),
    )
    await server.start()
    out: list[bytes | grpc.StatusCode] = []
    try:
        for host, creds in calls:
            target = f"{host}:{port}"
            channel = (
                grpc.aio.insecure_channel(target) if creds is None else grpc.aio.secure_channel(target, creds)
            )
            async with channel:
                try:
                    out.append(await channel.unary_unary(METHOD)(b"hi", timeout=5))
                except grpc.aio.AioRpcError as exc:
                    out.append(exc.code())
    finally:
        await server.stop(None)
    return out


def test_mutual_tls_with_our_certificates_and_refusals(tmp_path: Path) -> None:
    ca = pki.CertificateAuthority.create(common_name="grpc test CA", now=NOW, validity=30 * DAY)
    foreign = pki.CertificateAuthority.create(common_name="grpc test CA", now=NOW, validity=30 * DAY)
    key, cert = new_device(ca, "dev-1")
    good = grpc.ssl_channel_credentials(ca.certificate_pem, key, cert)

    async def whoami(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        peer = context.auth_context()["x509_pem_cert"][0]
        return pki.device_id_from_certificate(peer).encode()

    results = asyncio.run(
        serve_and_call(
            ca,
            whoami,
            [
                ("127.0.0.1", good),
                ("localhost", good),  # both names are in the server certificate
                ("127.0.0.1", grpc.ssl_channel_credentials(ca.certificate_pem)),  # no client certificate
                (
                    "127.0.0.1",
                    grpc.ssl_channel_credentials(ca.certificate_pem, *new_device(foreign)),
                ),  # foreign CA
                (
                    "127.0.0.1",
                    grpc.ssl_channel_credentials(foreign.certificate_pem, key, cert),
                ),  # untrusted server
                (
                    "127.0.0.1",
                    grpc.ssl_channel_credentials(ca.certificate_pem, *ed25519_device(ca)),
                ),  # Ed25519
                ("127.0.0.1", None),  # plaintext
            ],
        )
    )
    assert results[:2] == [b"dev-1", b"dev-1"]
    assert results[2:] == [grpc.StatusCode.UNAVAILABLE] * 5


def test_peer_certificate_authenticates_only_registered_devices(tmp_path: Path) -> None:
    ca = pki.CertificateAuthority.create(common_name="grpc test CA", now=NOW, validity=30 * DAY)
    with open_storage(f"sqlite://{tmp_path / 'agg.db'}", create=True) as storage:
        service = EnrollmentService(storage=storage, ca=ca)
        tls_keys = {name: pki.TlsPrivateKey.generate() for name in ("dev-a", "dev-b")}
        certs = {}
        for name, tls in tls_keys.items():
            csr = pki.create_device_csr(device_id=name, tls_key=tls, identity_key=IdentityKey.generate())
            certs[name] = service.enroll(token=service.create_token().token, csr_pem=csr).certificate_pem
        service.revoke("dev-b")
        # Signed by the right CA but never registered (as if enrollment had failed after issuing).
        stray_key, stray_cert = new_device(ca, "dev-a")

        async def whoami(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
            try:
                device = service.authenticate(context.auth_context()["x509_pem_cert"][0])
            except AuthenticationError:
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, "client certificate is not acceptable")
            return device.device_id.encode()

        def creds(key: bytes, cert: bytes) -> grpc.ChannelCredentials:
            return grpc.ssl_channel_credentials(ca.certificate_pem, key, cert)

        results = asyncio.run(
            serve_and_call(
                ca,
                whoami,
                [
                    ("127.0.0.1", creds(tls_keys["dev-a"].dangerously_export_pem(), certs["dev-a"])),
                    ("127.0.0.1", creds(tls_keys["dev-b"].dangerously_export_pem(), certs["dev-b"])),
                    ("127.0.0.1", creds(stray_key, stray_cert)),
                ],
            )
        )
    assert results == [b"dev-a", grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.PERMISSION_DENIED]


def test_auth_context_carries_the_presented_certificate() -> None:
    ca = pki.CertificateAuthority.create(common_name="grpc test CA", now=NOW, validity=DAY)
    key, cert = new_device(ca, "dev-1")

    async def echo_cert(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        return bytes(context.auth_context()["x509_pem_cert"][0])

    (peer,) = asyncio.run(
        serve_and_call(
            ca, echo_cert, [("127.0.0.1", grpc.ssl_channel_credentials(ca.certificate_pem, key, cert))]
        )
    )
    assert isinstance(peer, bytes)
    assert pki.certificate_fingerprint(peer) == pki.certificate_fingerprint(cert)
