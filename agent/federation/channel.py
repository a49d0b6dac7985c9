"""Secure gRPC channels to the aggregator, trusting only the pinned deployment CA.

The enrollment channel is server-authenticated TLS (the device has no certificate yet); every other call goes
over mutual TLS with the device certificate. The system trust store is never used: ``root_certificates`` is
always the CA saved at enrollment.
"""

from __future__ import annotations

import grpc

from agent.federation.state import DeviceState

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


def enrollment_channel(target: str, *, ca_pem: bytes) -> grpc.aio.Channel:
    """Open a server-authenticated TLS channel to the enrollment port, pinned to ``ca_pem``."""
    creds = grpc.ssl_channel_credentials(root_certificates=ca_pem)
    return grpc.aio.secure_channel(target, creds, options=channel_options())


def federation_channel(state: DeviceState) -> grpc.aio.Channel:
    """Open a mutual-TLS channel to the federation port with the device's certificate and key."""
    creds = grpc.ssl_channel_credentials(
        root_certificates=state.ca_pem(),
        private_key=state.tls_key().unsafe_export_pem(),
        certificate_chain=state.certificate_pem(),
    )
    return grpc.aio.secure_channel(state.target, creds, options=channel_options())
