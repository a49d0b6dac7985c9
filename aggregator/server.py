"""Build and run the aggregator's ``grpc.aio`` servers: TLS 1.3, mutual TLS, size limits, health service.

Two servers, one port each, with different TLS credentials and receive limits:

* the **federation** port requires a client certificate signed by the deployment CA (mutual TLS); a client
  without one, with a foreign-CA one, or speaking plaintext fails the handshake;
* the **enrollment** port is server-authenticated TLS only, because an enrolling device has no certificate
  yet, so it receives at most :attr:`~fedfer.aggregator.service.EdgeLimits.enrollment_port_bytes` (32 KiB) per
  message: a peer without a certificate cannot make the aggregator buffer a large body. Every service is
  registered on both ports, but only ``Enrollment`` and the health service answer a peer without a verified
  client certificate: the others return ``UNAUTHENTICATED``.

On both, request bodies reach the servicers as bytes and are parsed only after the caller is authenticated
and the body fits its method's limit (:func:`fedfer.aggregator.service.register`).

gRPC's TLS stack negotiates TLS 1.3 with current clients but would accept TLS 1.2; the servicer edge
(:func:`fedfer.aggregator.service.authenticate`) refuses any call whose connection is not TLS 1.3.

The standard ``grpc.health.v1`` service reports, per service name:

* ``""`` (the process), ``fedfer.v1.Enrollment`` and ``fedfer.v1.Models``: ``SERVING`` while the server runs,
  on every replica (they are stateless over the shared storage);
* ``fedfer.v1.Federation`` (:data:`FEDERATION_SERVICE`): ``SERVING`` only on the replica that holds the
  coordinator lease and has recovered the interrupted round, ``NOT_SERVING`` on standbys (their federation
  calls answer ``UNAVAILABLE``);
* everything ``NOT_SERVING`` once the server stops or drains.

Optionally the health service alone is also served on a plaintext port (``health_listen``): the kubelet's gRPC
probe speaks plaintext and cannot present a client certificate. That port answers nothing but health checks.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from fedfer.aggregator.enrollment import EnrollmentService
from fedfer.aggregator.registry import ModelRegistry
from fedfer.aggregator.rounds import RoundCoordinator
from fedfer.aggregator.service import EdgeLimits, EnrollmentRpc, FederationRpc, ModelsRpc, register
from fedfer.aggregator.storage import Storage, StorageError
from fedfer.security.errors import ValidationError

__all__ = [
    "FEDERATION_SERVICE",
    "SERVICE_NAMES",
    "RunningServer",
    "ServerTls",
    "build_server",
    "expire_responses",
    "serve_forever",
]

_log = logging.getLogger(__name__)
SERVICE_NAMES = ("fedfer.v1.Enrollment", "fedfer.v1.Federation", "fedfer.v1.Models")
FEDERATION_SERVICE = "fedfer.v1.Federation"
"""The health-service name that is ``SERVING`` only on the leading replica (readiness probes ask for it)."""
_DRAIN_S = 1.0  # after SIGTERM: NOT_SERVING this long before the ports close
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


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
        server: the ``grpc.aio`` server of the mutual-TLS federation port.
        port: the mutual-TLS federation port.
        enroll_port: the server-TLS-only enrollment port.
        health: the health servicer (everything NOT_SERVING while draining).
        enroll_server: the server of the enrollment port (small receive limit).
        health_server: the plaintext health-only server, if one was asked for.
        health_port: its port (0 when there is none).
    """

    server: grpc.aio.Server
    port: int
    enroll_port: int
    health: health.aio.HealthServicer
    enroll_server: grpc.aio.Server | None = None
    health_server: grpc.aio.Server | None = None
    health_port: int = 0

    async def set_leader(self, leading: bool) -> None:
        """Report the federation service SERVING (this replica leads) or NOT_SERVING (standby)."""
        await self.health.set(FEDERATION_SERVICE, _SERVING if leading else _NOT_SERVING)

    async def stop(self, grace: float | None = 1.0, *, drain_s: float = 0.0) -> None:
        """Drain and stop: mark every service NOT_SERVING for good, keep answering for ``drain_s`` seconds
        (so health-checking balancers move new traffic away first), then stop accepting and give in-flight
        calls ``grace`` seconds. The health-only port stops last."""
        await self.health.enter_graceful_shutdown()
        if drain_s > 0:
            await asyncio.sleep(drain_s)
        stopping = [self.server.stop(grace)]
        if self.enroll_server is not None:
            stopping.append(self.enroll_server.stop(grace))
        await asyncio.gather(*stopping)
        if self.health_server is not None:
            await self.health_server.stop(grace)


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
    health_listen: str | None = None,
    advertise_port: int | None = None,
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
        health_listen: ``host:port`` of a plaintext port serving only ``grpc.health.v1`` (None: no such
            port; health is still served on the TLS ports).
        advertise_port: the federation port enrolling devices are told to use (default: the bound one; set
            it when devices reach the aggregator through a balancer on another port).

    Returns:
        The running server with its bound ports. The federation service reports NOT_SERVING until the
        coordinator leads (see :meth:`RunningServer.set_leader`, registered with the coordinator here).

    Raises:
        ValidationError: a port could not be bound.
    """

    def options(receive_bytes: int) -> list[tuple[str, int]]:
        return [
            ("grpc.max_receive_message_length", receive_bytes),
            ("grpc.max_send_message_length", limits.max_message_bytes),
            ("grpc.max_concurrent_streams", 256),
            ("grpc.so_reuseport", 0),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.keepalive_permit_without_calls", 1),
        ]

    server = grpc.aio.server(options=options(limits.federation_port_bytes), maximum_concurrent_rpcs=4096)
    enroll_server = grpc.aio.server(
        options=options(limits.enrollment_port_bytes), maximum_concurrent_rpcs=1024
    )
    pair = [(tls.private_key_pem, tls.certificate_pem)]
    mutual = grpc.ssl_server_credentials(
        pair, root_certificates=tls.ca_certificate_pem, require_client_auth=True
    )
    server_only = grpc.ssl_server_credentials(pair)
    try:
        port = server.add_secure_port(listen, mutual)
        enroll_port = enroll_server.add_secure_port(enroll_listen, server_only)
    except RuntimeError as exc:
        raise ValidationError("cannot bind the listen address") from exc
    if port == 0 or enroll_port == 0:
        raise ValidationError("cannot bind the listen address")
    if advertise_port is not None and (type(advertise_port) is not int or not 0 < advertise_port < 65536):
        raise ValidationError("advertise_port must be a port number")
    federation = FederationRpc(storage=storage, enrollment=enrollment, coordinator=coordinator, limits=limits)
    models = ModelsRpc(enrollment=enrollment, registry=registry, limits=limits)
    enroll = EnrollmentRpc(
        storage=storage, enrollment=enrollment, federation_port=advertise_port or port, limits=limits
    )
    health_servicer = health.aio.HealthServicer()
    for each in (server, enroll_server):
        register(each, federation=federation, models=models, enrollment=enroll)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, each)
    health_server, health_port = None, 0
    if health_listen is not None:
        health_server = grpc.aio.server(options=[("grpc.so_reuseport", 0)], maximum_concurrent_rpcs=64)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, health_server)
        try:
            health_port = health_server.add_insecure_port(health_listen)
        except RuntimeError as exc:
            raise ValidationError("cannot bind the health listen address") from exc
        if health_port == 0:
            raise ValidationError("cannot bind the health listen address")
    for name in ("", *SERVICE_NAMES):
        await health_servicer.set(name, _SERVING)
    running = RunningServer(
        server=server,
        port=port,
        enroll_port=enroll_port,
        health=health_servicer,
        enroll_server=enroll_server,
        health_server=health_server,
        health_port=health_port,
    )
    await running.set_leader(coordinator.is_leader)
    coordinator.on_leadership(running.set_leader)
    await server.start()
    await enroll_server.start()
    if health_server is not None:
        await health_server.start()
    _log.info(
        "aggregator listening: mutual TLS on port %d, enrollment on port %d, health on port %s",
        port,
        enroll_port,
        health_port or "(TLS ports only)",
    )
    return running


async def expire_responses(
    storage: Storage, *, retention_s: float, clock: Callable[[], float] = time.time
) -> None:
    """Delete idempotency records older than ``retention_s``, every ``retention_s / 4`` (at most a minute),
    until cancelled. A storage failure is logged and retried at the next pass.

    A request id replayed after that is treated as a new request: harmless for stage messages (the
    coordinator recognises a repeat by its content) and long after any enrollment retry.
    """
    if not 0 < retention_s < math.inf:
        raise ValidationError("retention_s must be a positive number")
    interval = min(60.0, retention_s / 4)
    while True:
        before = dt.datetime.fromtimestamp(clock() - retention_s, dt.UTC)
        try:
            deleted = storage.delete_responses_before(before=before)
        except StorageError as exc:
            _log.warning("idempotency records not expired: %s", exc)
        else:
            if deleted:
                _log.info("expired %d idempotency records", deleted)
        await asyncio.sleep(interval)


async def serve_forever(
    running: RunningServer, coordinator: RoundCoordinator, *, response_retention_s: float = 3600.0
) -> None:
    """Run the coordinator beside the server until SIGTERM/SIGINT, then drain and stop both; expire old
    idempotency records meanwhile (:func:`expire_responses`).

    The coordinator waits as a standby until it holds the lease, then leads. When it has run all its rounds
    it keeps the lease and the server keeps answering (devices still learn how the last round ended) until
    it is told to stop. Stopping leaves a round in progress to the next leader (it is not aborted) and
    releases the lease, so a standby takes over at once.

    Raises:
        LeadershipLostError: the lease was lost while leading. The server is stopped first; the process
            should exit and be restarted (it comes back as a standby).
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    task = asyncio.create_task(coordinator.serve(), name="rounds")
    janitor = asyncio.create_task(
        expire_responses(coordinator.storage, retention_s=response_retention_s), name="expire responses"
    )
    stopper = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    try:
        if task in done:
            task.result()  # surfaces a coordinator crash or a lost lease
    finally:
        _log.info("stopping aggregator")
        stopper.cancel()
        janitor.cancel()
        coordinator.stop(hand_over=True)
        # NOT_SERVING at once; the ports close after the drain. Meanwhile the coordinator leaves its round
        # and the lease goes (a no-op unless this replica still holds it), so a standby takes over now.
        stopping = asyncio.create_task(running.stop(grace=2.0, drain_s=_DRAIN_S))
        if not task.done():
            await asyncio.wait({task}, timeout=2.0)
            task.cancel()
        coordinator.release()
        await stopping
