"""Enroll a device: new keys, a CSR, a one-time token exchanged for a certificate, state saved 0600.

Enrollment ends by pinning the aggregator's TLS certificate: the device opens one mutual-TLS handshake to the
federation port (verified against the CA and the aggregator's name) and keeps the certificate it was shown
as the only trust anchor of every later call (:func:`fedfer.agent.federation.channel.federation_channel`).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hmac
import os
import secrets
import ssl
import uuid
from pathlib import Path

from fedfer.agent.federation.channel import Interceptors, enrollment_channel
from fedfer.agent.federation.retry import RetryPolicy, call_with_retry
from fedfer.agent.federation.state import (
    DeviceState,
    StateError,
    parse_target,
    write_private_file,
    write_public_file,
)
from fedfer.security import pki
from fedfer.security.errors import IntegrityError
from fedfer.security.keys import IdentityKey
from fedfer.v1 import enrollment_pb2, enrollment_pb2_grpc

__all__ = ["enroll", "new_device_id"]

_PENDING_KEYS = ("tls_key.pem", "identity_key.pem")


def new_device_id() -> str:
    """Return a fresh random device id (``dev-`` + 16 hex digits from the OS CSPRNG)."""
    return "dev-" + secrets.token_hex(8)


def _load_or_create_keys(directory: Path) -> tuple[pki.TlsPrivateKey, IdentityKey]:
    """Keys are written before the token is spent, so a crash mid-enrollment can retry with the same keys."""
    tls_path, id_path = (directory / n for n in _PENDING_KEYS)
    if tls_path.is_file() and id_path.is_file():
        return pki.TlsPrivateKey.from_pem(tls_path.read_bytes()), IdentityKey.from_pem(id_path.read_bytes())
    tls_key, identity_key = pki.TlsPrivateKey.generate(), IdentityKey.generate()
    write_private_file(tls_path, tls_key.dangerously_export_pem())
    write_private_file(id_path, identity_key.dangerously_export_pem())
    return tls_key, identity_key


async def enroll(
    *,
    server: str,
    ca_pem: bytes,
    token: str,
    state_dir: Path,
    device_id: str | None = None,
    policy: RetryPolicy | None = None,
    timeout_s: float = 10.0,
    interceptors: Interceptors = (),
) -> DeviceState:
    """Enroll this device with the aggregator and save its state.

    Args:
        server: ``host:port`` of the aggregator's enrollment endpoint.
        ca_pem: the deployment CA certificate, obtained out of band; the only CA trusted.
        token: the one-time enrollment token.
        state_dir: where keys, certificate and CA are stored (created 0700).
        device_id: the id to request (default: a fresh random one).
        policy: retry policy for transient failures (the request id makes retries harmless).
        timeout_s: per-attempt deadline.
        interceptors: client interceptors for the enrollment channel (tests record calls with them).

    Returns:
        The saved device state.

    Raises:
        StateError: the directory already holds an enrollment.
        IntegrityError: the aggregator answered with a certificate or CA that does not verify against the
            pinned CA.
        grpc.aio.AioRpcError: the aggregator refused (e.g. PERMISSION_DENIED for a used token).
        OSError: the federation port could not be reached to pin its certificate (the certificate issued so
            far is kept; the directory is not marked enrolled).
    """
    host, enroll_port = parse_target(server)
    state_dir = Path(state_dir)
    if (state_dir / "federation.json").exists():
        raise StateError("this state directory is already enrolled")
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(state_dir, 0o700)
    device_id = pki.validate_device_id(device_id if device_id is not None else new_device_id())
    tls_key, identity_key = _load_or_create_keys(state_dir)
    csr = pki.create_device_csr(device_id=device_id, tls_key=tls_key, identity_key=identity_key)
    request = enrollment_pb2.EnrollRequest(request_id=str(uuid.uuid4()), token=token, csr_pem=csr)
    async with enrollment_channel(server, ca_pem=ca_pem, interceptors=interceptors) as channel:
        stub = enrollment_pb2_grpc.EnrollmentStub(channel)
        reply: enrollment_pb2.EnrollResponse = await call_with_retry(
            lambda: stub.Enroll(request, timeout=timeout_s), policy=policy or RetryPolicy(), what="enroll"
        )
    if not hmac.compare_digest(reply.ca_certificate_pem, ca_pem):
        raise IntegrityError("aggregator presented a different CA than the pinned one")
    identity = pki.verify_device_certificate(
        reply.certificate_pem, ca_certificate_pem=ca_pem, now=dt.datetime.now(dt.UTC)
    )
    if identity.device_id != device_id or identity.identity_public_key != identity_key.public_bytes():
        raise IntegrityError("issued certificate does not match the request")
    write_public_file(state_dir / "ca.pem", ca_pem)
    write_public_file(state_dir / "device.pem", reply.certificate_pem)
    pinned = await _server_certificate(
        host, int(reply.federation_port), ca_pem=ca_pem, directory=state_dir, timeout_s=timeout_s
    )
    write_public_file(state_dir / "server.pem", pinned)
    state = DeviceState(
        directory=state_dir,
        device_id=device_id,
        host=host,
        port=int(reply.federation_port),
        enroll_port=enroll_port,
    )
    state.save_meta()
    return state


async def _server_certificate(
    host: str, port: int, *, ca_pem: bytes, directory: Path, timeout_s: float
) -> bytes:
    """The certificate the federation port presents, verified against ``ca_pem`` and ``host`` (PEM).

    One TLS 1.3 handshake with the device's new certificate (the port requires one), offering HTTP/2 as gRPC
    does; the connection is closed right after.
    """
    context = ssl.create_default_context(cadata=ca_pem.decode("ascii"))
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.set_alpn_protocols(["h2"])
    context.load_cert_chain(certfile=directory / "device.pem", keyfile=directory / "tls_key.pem")
    _, writer = await asyncio.wait_for(
        asyncio.open_connection(host, port, ssl=context, server_hostname=host), timeout=timeout_s
    )
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    finally:
        # Only the certificate was wanted: drop the connection at once. A graceful TLS close would wait for
        # the server's close_notify, which a gRPC server may send only after its handshake timeout (~30 s).
        writer.transport.abort()
    if not der:
        raise IntegrityError("the aggregator presented no certificate")
    return ssl.DER_cert_to_PEM_cert(der).encode("ascii")
