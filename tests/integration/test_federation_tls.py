"""The aggregator refuses TLS 1.2 at the handshake on both ports and speaks TLS 1.3 (real process)."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

import pytest

from tests.integration.federation_harness import Deployment


def _handshake(port: int, ca: Path, *, maximum: ssl.TLSVersion) -> str:
    context = ssl.create_default_context(cafile=str(ca))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.maximum_version = maximum
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        version = tls.version()
        assert version is not None
        return version


def test_a_tls12_only_client_fails_the_handshake_and_tls13_succeeds(tmp_path: Path) -> None:
    dep = Deployment(tmp_path / "agg", min_clients=2, max_clients=2, deadline_s=30)
    agg = dep.serve()
    ca = dep.dir / "pki" / "ca.pem"
    try:
        for port in (agg.port, agg.enroll_port):
            with pytest.raises((ssl.SSLError, ConnectionResetError)):
                _handshake(port, ca, maximum=ssl.TLSVersion.TLSv1_2)
        # The server-authenticated enrollment port completes a TLS 1.3 handshake with no client certificate.
        assert _handshake(agg.enroll_port, ca, maximum=ssl.TLSVersion.TLSv1_3) == "TLSv1.3"
        assert "Traceback" not in agg.log()
    finally:
        agg.kill()
