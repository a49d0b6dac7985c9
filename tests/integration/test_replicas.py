"""Two ``fedfer-aggregator serve`` replicas on one real PostgreSQL, behind a health-checking L4 balancer.

The balancer (TLS passes through it) sends each new connection to the replica whose plaintext health port
reports ``fedfer.v1.Federation`` SERVING, as a Kubernetes Service does with the manifest's readinessProbe, and
refuses connections while there is none. Real device processes enroll and take part through it.
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fedfer.agent.federation.state import DeviceState
from fedfer.bench.tcp_proxy import TcpProxy, Upstream
from tests.integration.federation_harness import Aggregator, Deployment, assert_published, random_updates
from tests.postgres import PostgresServer

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
FEDERATION = "fedfer.v1.Federation"


def health_of(port: int, service: str = FEDERATION) -> int | None:
    """The status a replica's health-only port reports for ``service`` (None if it does not answer)."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=2
            )
        except grpc.RpcError:
            return None
    return int(reply.status)


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


class Balancer:
    """Federation and enrollment listeners whose connections go to the replica that reports SERVING."""

    def __init__(self) -> None:
        self.backends: list[Aggregator] = []
        self._ready: Aggregator | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self.federation = TcpProxy(lambda: self._pick(lambda b: b.port))
        self.enrollment = TcpProxy(lambda: self._pick(lambda b: b.enroll_port))

    def _pick(self, port: Callable[[Aggregator], int]) -> Upstream | None:
        ready = self._ready
        return None if ready is None else ("127.0.0.1", port(ready))

    async def _probe(self) -> None:
        while True:
            ready = None
            for backend in list(self.backends):
                if await asyncio.to_thread(health_of, backend.health_port) == SERVING:
                    ready = backend
                    break
            self._ready = ready
            await asyncio.sleep(0.2)

    def start(self) -> None:
        self._thread.start()

        async def start() -> None:
            await self.federation.start()
            await self.enrollment.start()
            self._probing = asyncio.create_task(self._probe())

        asyncio.run_coroutine_threadsafe(start(), self._loop).result(timeout=10)

    def stop(self) -> None:
        async def stop() -> None:
            self._probing.cancel()
            await self.federation.close()
            await self.enrollment.close()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)


def leader_and_standby(dep: Deployment, args: tuple[str, ...], replicas: list[Aggregator]) -> None:
    """Start a replica and wait until it leads, then a second one; both are appended to ``replicas`` (for
    the caller to kill). Checks that the second stays a standby: alive, federation NOT_SERVING."""
    replicas.append(dep.serve(*args))
    wait_for(lambda: health_of(replicas[0].health_port) == SERVING, "the first replica to lead")
    replicas.append(dep.serve(*args))
    time.sleep(2.0)  # a standby asks for the lease every second: it has been refused twice by now
    assert health_of(replicas[1].health_port) == NOT_SERVING
    assert health_of(replicas[1].health_port, "") == SERVING  # alive: the liveness probe's service name
    assert health_of(replicas[0].health_port) == SERVING


def test_two_replicas_on_postgres_fail_over_without_losing_or_repeating_a_round(
    tmp_path: Path, postgres_server: PostgresServer
) -> None:
    dep = Deployment(
        tmp_path / "agg",
        min_clients=4,
        max_clients=5,
        deadline_s=10,
        storage_url=postgres_server.new_database(),
    )
    balancer = Balancer()
    balancer.start()
    common = ("--checkin-s", "1", "--lease-ttl-s", "3", "--health-listen", "127.0.0.1:0")
    common += ("--advertise-port", str(balancer.federation.port))
    replicas: list[Aggregator] = []
    try:
        leader_and_standby(dep, common, replicas)
        first, second = replicas
        balancer.backends = [first, second]

        devices = dep.enroll_devices(5, balancer.enrollment.port, tmp_path)
        assert {DeviceState.load(d.state).port for d in devices} == {balancer.federation.port}
        updates, weights = random_updates(devices, seed=5)
        # Round 1 completes with all five; round 2 waits in the masked-input stage for a device that hung
        # after sharing keys, and the leader is SIGKILLed once the other four's masked inputs are stored.
        staller, others = dep.hold_round_two_in_masked_input(
            devices, updates, weights, rounds=3, timeout_s=240
        )
        assert dep.round_statuses() == ["published", "masked_input"]
        assert health_of(second.health_port) == NOT_SERVING  # the standby waited, touching nothing
        assert first.kill() == -9
        staller.kill()
        # The standby takes over once the lease expires, resumes round 2, publishes it, and runs round 3.
        results = [d.finish(timeout=240) for d in others]
        assert health_of(second.health_port) == SERVING
    finally:
        for replica in replicas:
            replica.kill()
        balancer.stop()
    for code, lines, err in results:
        assert code == 0, err[-1500:]
        assert [line["status"] for line in lines] == ["published"] * 3
    status = dep.status()
    finished = [r for r in status["rounds"] if r["status"] != "open"]  # the new leader may open round 4
    assert [(r["round_id"], r["status"], r["model_version"]) for r in finished] == [
        (1, "published", 2),
        (2, "published", 3),
        (3, "published", 4),
    ]
    assert status["model_versions"] == [1, 2, 3, 4]  # one version per round: nothing published twice
    assert finished[0]["participants"] == sorted(updates)
    rest = {d.device_id: updates[d.device_id] for d in others}
    assert finished[1]["participants"] == finished[2]["participants"] == sorted(rest)
    assert dep.device_ids() == sorted(updates)  # no registered device lost
    rest_weights = {d: weights[d] for d in rest}
    assert_published(dep, 2, 1, updates, weights, n=5)
    assert_published(dep, 3, 2, rest, rest_weights, n=5)
    assert_published(dep, 4, 3, rest, rest_weights, n=4)
    assert "resuming in stage masked_input" in second.log()
    assert "published model version 2" in first.log() and "published model version 2" not in second.log()
    assert "Traceback" not in second.log()


def test_sigterm_on_the_leader_hands_over_to_the_standby_at_once(tmp_path: Path) -> None:
    # Two replicas of one SQLite deployment on one host: the same lease, through the same storage interface.
    dep = Deployment(tmp_path / "agg", min_clients=2, max_clients=2, deadline_s=10)
    common = ("--lease-ttl-s", "30", "--health-listen", "127.0.0.1:0")  # a takeover by expiry would be slow
    replicas: list[Aggregator] = []
    try:
        leader_and_standby(dep, common, replicas)
        first, second = replicas
        assert dep.round_statuses() == ["open"]  # the leader's check-in round, untouched by the standby
        stopped = time.monotonic()
        assert first.kill(signal.SIGTERM) == 0
        wait_for(lambda: health_of(second.health_port) == SERVING, "the takeover", timeout=15)
        took = time.monotonic() - stopped
    finally:
        for replica in replicas:
            replica.kill()
    assert took < 10, took  # released, not expired (the TTL is 30 s)
    # The handed-over round was still in check-in (nothing persisted): the new leader aborted it and opened
    # the next one.
    assert dep.round_statuses()[:2] == ["aborted", "open"]
    assert "released the coordinator lease" in first.log()
    assert "Traceback" not in first.log() + second.log()
