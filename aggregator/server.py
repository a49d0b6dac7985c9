"""Build and run the aggregator's ``grpc.aio`` server: TLS 1.3, mutual TLS, size limits, health service.

The server listens on two ports with different TLS credentials:

* the **federation** port requires a client certificate signed by the deployment CA (mutual TLS); a client
  without one, with a foreign-CA one, or speaking plaintext fails the handshake;
* the **enrollment** port is server-authenticated TLS only, because an enrolling device has no certificate
  yet. Every service is registered on both ports, but only ``Enrollment`` and the health service answer a
  peer without a verified client certificate: the others return ``UNAUTHENTICATED``.

gRPC's TLS stack negotiates TLS 1.3 with current clients but would accept TLS 1.2; the servicer edge
(:func:`aggregator.service.authenticate`) refuses any call whose connection is not TLS 1.3.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from aggregator.enrollment import EnrollmentService
from aggregator.registry import ModelRegistry
from aggregator.rounds import RoundCoordinator
from aggregator.service import EdgeLimits, EnrollmentRpc, FederationRpc, ModelsRpc
from aggregator.storage import Storage
from protos.fedfer.v1 import enrollment_pb2_grpc, federation_pb2_grpc, models_pb2_grpc
from security.errors import ValidationError

__all__ = ["RunningServer", "ServerTls", "build_server", "serve_forever"]

_log = logging.getLogger(__name__)
SERVICE_NAMES = ("fedfer.v1.Enrollment", "fedfer.v1.Federation", "fedfer.v1.Models")


@dataclass(frozen=True, repr=False)
class ServerTls:
    """PEM material of the server's TLS identity and the CA that signs device certificates.

    Attributes:
        certificate_pem: the server certificate chain.
        private_key_pem: the server's private key (never logged; redacted from repr).
        ca_certificate_pem: the deployment CA; the only issuer accepted for client certificates.
    """

    certificate_pem: bytes
    private_key_pem: bytes
    ca_certificate_pem: bytes

    def __repr__(self) -> str:
        return "ServerTls(<redacted>)"


@dataclass
class RunningServer:
    """A started server and the ports it bound.

    Attributes:
        server: the ``grpc.aio`` server.
        port: the mutual-TLS federation port.
        enroll_port: the server-TLS-only enrollment port.
        health: the health servicer (set to NOT_SERVING while draining).
    """

    server: grpc.aio.Server
    port: int
    enroll_port: int
    health: health.aio.HealthServicer

    async def stop(self, grace: float | None = 1.0) -> None:
        """Mark the services NOT_SERVING, then stop accepting and finish in-flight calls within ``grace``."""
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.stop(grace)


async def build_server(
    *,
    tls: ServerTls,
    storage: Storage,
    registry: ModelRegistry,
    enrollment: EnrollmentService,
    coordinator: RoundCoordinator,
    limits: EdgeLimits,
    listen: str,
    enroll_listen: str,
) -> RunningServer:
    """Create, bind and start the server.

    Args:
        tls: server certificate/key and the deployment CA.
        storage: the deployment's storage.
        registry: the model registry.
        enrollment: device enrollment and authentication.
        coordinator: the round orchestrator (its task is started by the caller).
        limits: message size limits.
        listen: ``host:port`` of the mutual-TLS port (port 0 picks a free port).
        enroll_listen: ``host:port`` of the enrollment port.

    Returns:
        The running server with its bound ports.

    Raises:
        ValidationError: a port could not be bound.
    """
    options = [
        ("grpc.max_receive_message_length", limits.max_message_bytes),
        ("grpc.max_send_message_length", limits.max_message_bytes),
        ("grpc.max_concurrent_streams", 256),
        ("grpc.so_reuseport", 0),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.keepalive_permit_without_calls", 1),
    ]
    server = grpc.aio.server(options=options, maximum_concurrent_rpcs=4096)
    pair = [(tls.private_key_pem, tls.certificate_pem)]
    mutual = grpc.ssl_server_credentials(
        pair, root_certificates=tls.ca_certificate_pem, require_client_auth=True
    )
    server_only = grpc.ssl_server_credentials(pair)
    try:
        port = server.add_secure_port(listen, mutual)
        enroll_port = server.add_secure_port(enroll_listen, server_only)
    except RuntimeError as exc:
        raise ValidationError("cannot bind the listen address") from exc
    if port == 0 or enroll_port == 0:
        raise ValidationError("cannot bind the listen address")
    federation_pb2_grpc.add_FederationServicer_to_server(
        FederationRpc(storage=storage, enrollment=enrollment, coordinator=coordinator, limits=limits), server
    )
    models_pb2_grpc.add_ModelsServicer_to_server(ModelsRpc(enrollment=enrollment, registry=registry), server)
    enrollment_pb2_grpc.add_EnrollmentServicer_to_server(
        EnrollmentRpc(storage=storage, enrollment=enrollment, federation_port=port), server
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    await server.start()
    for name in ("", *SERVICE_NAMES):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    _log.info("aggregator listening: mutual TLS on port %d, enrollment on port %d", port, enroll_port)
    return RunningServer(server=server, port=port, enroll_port=enroll_port, health=health_servicer)


async def serve_forever(running: RunningServer, coordinator: RoundCoordinator) -> None:
    """Run the coordinator beside the server until SIGTERM/SIGINT, then drain and stop both.

    When the coordinator has run all its rounds the server keeps answering (devices still learn how the
    last round ended) until it is told to stop.
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    task = asyncio.create_task(coordinator.run(), name="rounds")
    stopper = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        task.result()  # surfaces a coordinator crash
        _log.info("all rounds done; serving status until stopped")
        await stopper
    _log.info("stopping aggregator")
    coordinator.stop()
    await running.stop(grace=2.0)
    if not task.done():
        await asyncio.wait({task}, timeout=2.0)
        task.cancel()
