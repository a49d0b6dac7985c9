"""The ``grpc.health.v1`` service of two in-process replicas over real sockets.

The leader reports the federation service SERVING, the standby NOT_SERVING (and refuses federation calls with
UNAVAILABLE while it serves enrollment and models); a draining server reports everything NOT_SERVING; after
the leader stops, the standby takes over.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fedfer.agent.federation.client import FederationClient
from fedfer.agent.federation.enroll import enroll
from fedfer.aggregator.enrollment import issue_token
from fedfer.aggregator.rounds import RoundSettings
from fedfer.aggregator.server import FEDERATION_SERVICE, SERVICE_NAMES
from fedfer.v1 import federation_pb2, federation_pb2_grpc
from tests.integration.federation_harness import Harness, start, start_replica

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SETTINGS = RoundSettings(min_clients=2, max_clients=2)


async def check(target: str, service: str, *, ca_pem: bytes | None = None) -> int:
    """One health Check: plaintext (health-only port) or server-authenticated TLS (enrollment port)."""
    if ca_pem is None:
        channel = grpc.aio.insecure_channel(target)
    else:
        channel = grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(ca_pem))
    async with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        return int(reply.status)


async def eventually(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


def health(h: Harness) -> str:
    return f"127.0.0.1:{h.server.health_port}"


def test_leader_serves_federation_standby_does_not_and_takes_over_when_the_leader_stops(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        leader = await start(tmp_path, SETTINGS)
        standby: Harness | None = None
        try:
            await eventually(lambda: leader.coordinator.is_leader, "the first replica to lead")
            standby = await start_replica(tmp_path, SETTINGS)
            await asyncio.sleep(0.5)  # the standby has asked for the lease by now
            assert not standby.coordinator.is_leader
            # The leader: every service SERVING, on the plaintext health port and over TLS.
            for name in ("", *SERVICE_NAMES):
                assert await check(health(leader), name) == SERVING, name
            enroll_port = f"127.0.0.1:{leader.server.enroll_port}"
            assert await check(enroll_port, FEDERATION_SERVICE, ca_pem=leader.ca_pem) == SERVING
            # The standby: federation NOT_SERVING, the stateless services SERVING.
            assert await check(health(standby), FEDERATION_SERVICE) == NOT_SERVING
            for name in ("", "fedfer.v1.Enrollment", "fedfer.v1.Models"):
                assert await check(health(standby), name) == SERVING, name
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await check(health(leader), "no.such.Service")
            assert info.value.code() == grpc.StatusCode.NOT_FOUND

            # The standby enrolls devices and serves the model, but refuses federation calls (retryable).
            token = issue_token(standby.storage, now=dt.datetime.now(dt.UTC)).token
            state = await enroll(
                server=f"127.0.0.1:{standby.server.enroll_port}",
                ca_pem=standby.ca_pem,
                token=token,
                state_dir=tmp_path / "dev",
            )
            assert state.port == standby.server.port
            async with FederationClient(state=state) as client:
                assert (await client.fetch_model()).version == "1"
            creds = grpc.ssl_channel_credentials(
                root_certificates=state.ca_pem(),
                private_key=state.tls_key().dangerously_export_pem(),
                certificate_chain=state.certificate_pem(),
            )
            async with grpc.aio.secure_channel(state.target, creds) as channel:
                stub = federation_pb2_grpc.FederationStub(channel)
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.GetRound(federation_pb2.GetRoundRequest(), timeout=5)
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE
                assert info.value.details() == "not the active aggregator, retry"
            # The standby left the leader's round alone.
            active = standby.storage.active_round()
            assert active is not None and active.status.key == "open"

            # The leader drains: NOT_SERVING everywhere (Check and an open Watch) before its ports close.
            async with grpc.aio.insecure_channel(health(leader)) as channel:
                watch = health_pb2_grpc.HealthStub(channel).Watch(
                    health_pb2.HealthCheckRequest(service=FEDERATION_SERVICE)
                )
                assert (await watch.read()).status == SERVING
                leader.coordinator.stop()
                stopping = asyncio.create_task(leader.server.stop(grace=0.5, drain_s=1.5))
                assert (await asyncio.wait_for(watch.read(), timeout=5)).status == NOT_SERVING
                for name in ("", *SERVICE_NAMES):
                    assert await check(health(leader), name) == NOT_SERVING, name
                assert await check(enroll_port, "", ca_pem=leader.ca_pem) == NOT_SERVING
                watch.cancel()
            await stopping
            await leader.close()  # releases the lease: the standby need not wait for it to expire

            await eventually(lambda: standby is not None and standby.coordinator.is_leader, "the takeover")
            assert await check(health(standby), FEDERATION_SERVICE) == SERVING
            async with grpc.aio.secure_channel(state.target, creds) as channel:
                status = await federation_pb2_grpc.FederationStub(channel).GetRound(
                    federation_pb2.GetRoundRequest(), timeout=5
                )
            assert status.round_id > active.round_id  # the old check-in round was aborted, a new one opened
        finally:
            with contextlib.suppress(Exception):
                await leader.close()
            if standby is not None:
                await standby.close()

    asyncio.run(asyncio.wait_for(main(), timeout=90))
