"""Secure gRPC channels to the aggregator: the CA at enrollment, the aggregator's own certificate after it.

The enrollment channel is server-authenticated TLS (the device has no certificate yet) trusting only the
deployment CA given out of band. Every other call goes over mutual TLS with the device certificate and
trusts only the aggregator certificate pinned at enrollment (:meth:`DeviceState.server_pem`), so another
certificate from the same CA is refused too. The system trust store is never used.

Both factories take optional client ``interceptors`` (``grpc.aio`` client interceptors, applied in order):
the seam through which tests record every call the device makes on the production channel.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from fedfer.agent.federation.state import DeviceState

__all__ = ["MAX_MESSAGE_BYTES", "channel_options", "enrollment_channel", "federation_channel"]

MAX_MESSAGE_BYTES = 8 * 1024 * 1024
"""Largest message the device sends or accepts (uploads are chunked well below it)."""


def channel_options() -> list[tuple[str, int]]:
    """gRPC channel options shared by every channel of the device."""
    return [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.enable_retries", 0),  # retries are ours, with idempotency keys and jittered backoff
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 2000),
    ]


Interceptors = Sequence[grpc.aio.ClientInterceptor]


def enrollment_channel(target: str, *, ca_pem: bytes, interceptors: Interceptors = ()) -> grpc.aio.Channel:
    """Open a server-authenticated TLS channel to the enrollment port, pinned to ``ca_pem``."""
    creds = grpc.ssl_channel_credentials(root_certificates=ca_pem)
    return grpc.aio.secure_channel(
        target, creds, options=channel_options(), interceptors=list(interceptors) or None
    )


def federation_channel(state: DeviceState, *, interceptors: Interceptors = ()) -> grpc.aio.Channel:
    """Open a mutual-TLS channel to the federation port with the device's certificate and key.

    The only trust anchor is the aggregator certificate pinned at enrollment (gRPC accepts a leaf
    certificate as its root: the presented certificate must be that one, for the target's name).
    """
    creds = grpc.ssl_channel_credentials(
        root_certificates=state.server_pem(),
        private_key=state.tls_key().dangerously_export_pem(),
        certificate_chain=state.certificate_pem(),
    )
    return grpc.aio.secure_channel(
        state.target, creds, options=channel_options(), interceptors=list(interceptors) or None
    )
