"""Limits before authentication, against a real ``fedfer-aggregator serve`` over loopback TLS 1.3.

Issue 12, findings 5 and 11: large bodies from a peer without a certificate were parsed before anything
checked the peer (128 x ~16 MiB took the aggregator from 78 MB to 1.11 GB and honest calls to 5.9-9.1 s), the
enrollment port accepted 16 MiB though an enrollment needs ~16 KiB, and an upload could use one chunk per
byte (60,000 chunks, ~10.5 s of server time).
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import grpc
import pytest

from fedfer.agent.federation.state import DeviceState
from fedfer.v1 import enrollment_pb2, enrollment_pb2_grpc, federation_pb2, federation_pb2_grpc
from tests.integration.federation_harness import Deployment, run_cli

pytestmark = pytest.mark.slow

BIG = 15 * 1024 * 1024  # under the old 16 MiB port limit, so only a per-port/per-method limit refuses it


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _mtls(state: DeviceState) -> Any:
    creds = grpc.ssl_channel_credentials(
        root_certificates=state.ca_pem(),
        private_key=state.tls_key().dangerously_export_pem(),
        certificate_chain=state.certificate_pem(),
    )
    return grpc.aio.secure_channel(state.target, creds, options=[("grpc.max_send_message_length", 64 << 20)])


def _rid() -> str:
    return str(uuid.uuid4())


async def _code(call: Any) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def test_large_bodies_are_refused_before_authentication_and_memory_stays_flat(tmp_path: Path) -> None:
    """Finding 5: per-port and per-method limits; the body of an unauthenticated peer is never buffered."""
    dep = Deployment(tmp_path / "agg", min_clients=2, max_clients=2, deadline_s=20)
    agg = dep.serve()
    peak: list[float] = []
    stop = threading.Event()
    try:
        (device, revoked) = dep.enroll_devices(2, agg.enroll_port, tmp_path)
        state, revoked_state = DeviceState.load(device.state), DeviceState.load(revoked.state)
        run_cli("fedfer-aggregator", "revoke", str(dep.dir), revoked.device_id)
        before = _rss_mb(agg.proc.pid)

        def sample() -> None:
            while not stop.is_set():
                peak.append(_rss_mb(agg.proc.pid))
                time.sleep(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()

        async def scenario() -> dict[str, Any]:
            big = os.urandom(BIG)
            target = f"127.0.0.1:{agg.enroll_port}"
            anonymous = grpc.ssl_channel_credentials(dep.ca_pem)
            async with grpc.aio.secure_channel(
                target, anonymous, options=[("grpc.max_send_message_length", 64 << 20)]
            ) as ch:
                enroll = enrollment_pb2_grpc.EnrollmentStub(ch)
                fed = federation_pb2_grpc.FederationStub(ch)
                gate = asyncio.Semaphore(8)

                async def flood(i: int) -> grpc.StatusCode:
                    async with gate:
                        if i % 2:
                            request = enrollment_pb2.EnrollRequest(
                                request_id=str(uuid.uuid4()), token="t" * 40, csr_pem=big
                            )
                            return await _code(enroll.Enroll(request, timeout=60))
                        message = federation_pb2.StageMessage(request_id=_rid(), round_id=1, payload=big)
                        return await _code(fed.AdvertiseKeys(message, timeout=60))

                async with _mtls(state) as honest_ch:
                    honest = federation_pb2_grpc.FederationStub(honest_ch)
                    await honest.GetRound(federation_pb2.GetRoundRequest(), timeout=10)
                    flooding = asyncio.gather(*(flood(i) for i in range(16)))
                    latencies = []
                    while not flooding.done():
                        start = time.monotonic()
                        await honest.GetRound(federation_pb2.GetRoundRequest(), timeout=30)
                        latencies.append(time.monotonic() - start)
                        await asyncio.sleep(0.1)
                    codes = await flooding
                    oversized_csr = await _code(
                        enroll.Enroll(
                            enrollment_pb2.EnrollRequest(
                                request_id=str(uuid.uuid4()), token="t" * 40, csr_pem=b"x" * (40 * 1024)
                            ),
                            timeout=10,
                        )
                    )
                    oversized_advert = await _code(
                        honest.AdvertiseKeys(
                            federation_pb2.StageMessage(
                                request_id=str(uuid.uuid4()), round_id=1, payload=b"\x00" * (1 << 20)
                            ),
                            timeout=10,
                        )
                    )
            async with _mtls(revoked_state) as revoked_ch:
                revoked_call = await _code(
                    federation_pb2_grpc.FederationStub(revoked_ch).AdvertiseKeys(
                        federation_pb2.StageMessage(request_id=_rid(), round_id=1, payload=bytes(1 << 20)),
                        timeout=10,
                    )
                )
            return {
                "codes": codes,
                "latencies": latencies,
                "oversized_csr": oversized_csr,
                "oversized_advert": oversized_advert,
                "revoked": revoked_call,
            }

        got = asyncio.run(scenario())
        stop.set()
        sampler.join(5)
        assert agg.proc.poll() is None
    finally:
        stop.set()
        agg.kill()
    assert set(got["codes"]) == {grpc.StatusCode.RESOURCE_EXHAUSTED}, got["codes"]
    growth = max(peak) - before
    assert growth < 100, f"RSS grew by {growth:.0f} MB while 16 x 15 MiB bodies were refused"
    assert max(got["latencies"]) < 2.0, got["latencies"]  # honest calls stay fast
    # An enrollment body is small; an AdvertiseKeys message is a few hundred bytes.
    assert got["oversized_csr"] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert got["oversized_advert"] == grpc.StatusCode.RESOURCE_EXHAUSTED
    # A revoked device is refused for who it is, before its body is even size-checked.
    assert got["revoked"] == grpc.StatusCode.PERMISSION_DENIED


def test_an_upload_of_one_byte_chunks_is_refused_at_its_first_chunk(tmp_path: Path) -> None:
    """Finding 11: the chunk count of an upload is bounded by its size."""
    dep = Deployment(tmp_path / "agg", min_clients=2, max_clients=2, deadline_s=20)
    agg = dep.serve()
    try:
        (device,) = dep.enroll_devices(1, agg.enroll_port, tmp_path)
        state = DeviceState.load(device.state)

        async def scenario() -> tuple[grpc.StatusCode, str, float, int]:
            sent = {"n": 0}
            request_id = str(uuid.uuid4())

            async def chunks() -> Any:
                for i in range(60_000):
                    sent["n"] += 1
                    yield federation_pb2.MaskedInputChunk(
                        request_id=request_id, round_id=1, index=i, count=60_000, total_bytes=60_000,
                        data=b"\x01",
                    )  # fmt: skip

            async with _mtls(state) as ch:
                start = time.monotonic()
                try:
                    await federation_pb2_grpc.FederationStub(ch).UploadMaskedInput(chunks(), timeout=60)
                except grpc.aio.AioRpcError as exc:
                    return exc.code(), exc.details() or "", time.monotonic() - start, sent["n"]
            return grpc.StatusCode.OK, "", time.monotonic() - start, sent["n"]

        code, details, took, sent = asyncio.run(scenario())
    finally:
        agg.kill()
    assert (code, details) == (grpc.StatusCode.INVALID_ARGUMENT, "malformed message")
    assert took < 3.0, took
    assert sent < 60_000  # the server stopped reading
