"""Hostile input against the aggregator's gRPC service, in-process but over real loopback TLS sockets.

Each hostile request must be refused with the right status and a fixed, sanitized message, while the honest
devices' round completes and matches the plaintext oracle.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import uuid
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
import pytest

from agent.federation.client import FederationClient
from agent.federation.enroll import enroll
from agent.federation.retry import RetryPolicy
from agent.federation.state import DeviceState
from aggregator.enrollment import issue_token
from aggregator.registry import ModelRegistry
from aggregator.rounds import RoundSettings
from protos.fedfer.v1 import common_pb2, federation_pb2, federation_pb2_grpc
from security import pki
from security.secagg.client import SecAggClient
from security.secagg.graph import NeighbourGraph
from security.secagg.messages import AdvertiseKeys, KeysBroadcast, SharesBroadcast, UnmaskRequest
from security.secagg.params import SecAggParams
from tests.integration.federation_harness import DIM, Harness
from tests.integration.federation_harness import run_in_process as run

SANITIZED = {
    "TLS 1.3 required",
    "client certificate required",
    "device is not authorized",
    "malformed message",
    "message too large",
    "wrong stage for this message",
    "not the current round",
    "not a participant of this stage",
    "request id already used for a different request",
    "message rejected by the protocol",
    "message failed verification",
    "round aborted",
}


async def expect(code: grpc.StatusCode, call: Awaitable[Any]) -> str:
    """Await a call that must fail with ``code`` and a sanitized message; return the message."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == code, (info.value.code(), info.value.details())
    details = info.value.details() or ""
    if code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED):
        assert details in SANITIZED, details
    return details


def mtls_channel(state: DeviceState, *, cert_pem: bytes | None = None, key_pem: bytes | None = None) -> Any:
    creds = grpc.ssl_channel_credentials(
        root_certificates=state.ca_pem(),
        private_key=key_pem if key_pem is not None else state.tls_key().unsafe_export_pem(),
        certificate_chain=cert_pem if cert_pem is not None else state.certificate_pem(),
    )
    return grpc.aio.secure_channel(state.target, creds)


def rid() -> str:
    return str(uuid.uuid4())


FAST = RetryPolicy(attempts=1)


def test_transport_level_rejections(tmp_path: Path) -> None:
    settings = RoundSettings(min_clients=2, max_clients=4)

    async def body(h: Harness) -> None:
        state = await h.enroll("good")
        stub_for = federation_pb2_grpc.FederationStub
        # A registered device over mutual TLS is served.
        async with mtls_channel(state) as ch:
            status = await stub_for(ch).GetRound(federation_pb2.GetRoundRequest(), timeout=10)
            assert status.stage in (common_pb2.STAGE_IDLE, common_pb2.STAGE_CHECK_IN)
        # No client certificate: the mutual-TLS port refuses the handshake ...
        async with grpc.aio.secure_channel(state.target, grpc.ssl_channel_credentials(h.ca_pem)) as ch:
            await expect(
                grpc.StatusCode.UNAVAILABLE,
                stub_for(ch).GetRound(federation_pb2.GetRoundRequest(), timeout=5),
            )
        # ... and on the enrollment port everything but enrollment needs a certificate.
        enroll_target = f"127.0.0.1:{h.server.enroll_port}"
        async with grpc.aio.secure_channel(enroll_target, grpc.ssl_channel_credentials(h.ca_pem)) as ch:
            msg = await expect(
                grpc.StatusCode.UNAUTHENTICATED,
                stub_for(ch).GetRound(federation_pb2.GetRoundRequest(), timeout=5),
            )
            assert msg == "client certificate required"
        # Plaintext (non-TLS) connections to either port fail.
        for target in (state.target, enroll_target):
            async with grpc.aio.insecure_channel(target) as ch:
                await expect(
                    grpc.StatusCode.UNAVAILABLE,
                    stub_for(ch).GetRound(federation_pb2.GetRoundRequest(), timeout=5),
                )
        # A certificate for the same device id from a foreign CA fails the handshake.
        now = dt.datetime.now(dt.UTC)
        foreign = pki.CertificateAuthority.create(
            common_name="foreign", now=now, validity=dt.timedelta(days=1)
        )
        tls_key, identity = pki.TlsPrivateKey.generate(), pki.IdentityKey.generate()
        csr = pki.parse_device_csr(
            pki.create_device_csr(device_id=state.device_id, tls_key=tls_key, identity_key=identity)
        )
        forged = foreign.issue_device_certificate(csr, now=now, validity=dt.timedelta(days=1))
        async with mtls_channel(
            state, cert_pem=forged.certificate_pem, key_pem=tls_key.unsafe_export_pem()
        ) as ch:
            await expect(
                grpc.StatusCode.UNAVAILABLE,
                stub_for(ch).GetRound(federation_pb2.GetRoundRequest(), timeout=5),
            )
        # A revoked device is refused on its next call, even though its certificate still chains to the CA.
        h.enrollment.revoke(state.device_id)
        async with mtls_channel(state) as ch:
            msg = await expect(
                grpc.StatusCode.PERMISSION_DENIED,
                stub_for(ch).GetRound(federation_pb2.GetRoundRequest(), timeout=5),
            )
            assert msg == "device is not authorized"
        # A used token is refused (and does not say why).
        token = issue_token(h.storage, now=dt.datetime.now(dt.UTC)).token
        await enroll(
            server=enroll_target, ca_pem=h.ca_pem, token=token, state_dir=h.root / "second", policy=FAST
        )
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await enroll(
                server=enroll_target, ca_pem=h.ca_pem, token=token, state_dir=h.root / "third", policy=FAST
            )
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert info.value.details() == "enrollment refused"

    run(tmp_path, settings, body)


async def _chunks(
    items: list[federation_pb2.MaskedInputChunk],
) -> AsyncIterator[federation_pb2.MaskedInputChunk]:
    for item in items:
        yield item


def test_hostile_participant_is_rejected_and_honest_round_completes(tmp_path: Path) -> None:
    settings = RoundSettings(min_clients=4, max_clients=4, degree=0, checkin_s=5.0, advertise_s=60.0,
                             share_s=60.0, masked_s=60.0, unmask_s=60.0, rounds=1)  # fmt: skip
    rng = np.random.default_rng(11)
    updates = [rng.normal(0, 0.3, DIM) for _ in range(4)]
    weights = [3, 5, 7, 11]

    async def body(h: Harness) -> None:
        states = [await h.enroll(f"dev{i}") for i in range(4)]
        honest_states, attacker = states[:3], states[3]

        async def honest(i: int) -> Any:
            async def update_fn(base: str, dim: int) -> tuple[npt.NDArray[np.float64], int]:
                return updates[i], weights[i]

            async with FederationClient(state=honest_states[i], poll_ms=2000) as client:
                return await client.join_round(update_fn, timeout_s=100)

        honest_tasks = [asyncio.create_task(honest(i)) for i in range(3)]
        async with mtls_channel(attacker) as ch:
            stub = federation_pb2_grpc.FederationStub(ch)
            status = await stub.GetRound(federation_pb2.GetRoundRequest(), timeout=10)
            while status.stage != common_pb2.STAGE_CHECK_IN:
                status = await stub.GetRound(
                    federation_pb2.GetRoundRequest(
                        known_round_id=status.round_id, known_stage=status.stage, wait_ms=2000
                    )
                )
            round_id = status.round_id
            # Messages before the protocol stage opened, and a malformed request id.
            await expect(
                grpc.StatusCode.FAILED_PRECONDITION,
                stub.AdvertiseKeys(
                    federation_pb2.StageMessage(request_id=rid(), round_id=round_id, payload=b"x")
                ),
            )
            await expect(
                grpc.StatusCode.INVALID_ARGUMENT,
                stub.JoinRound(federation_pb2.JoinRoundRequest(request_id="not-a-uuid", round_id=round_id)),
            )
            joined = await stub.JoinRound(
                federation_pb2.JoinRoundRequest(request_id=rid(), round_id=round_id)
            )
            assert joined.participant
            while status.stage != common_pb2.STAGE_ADVERTISE_KEYS:
                status = await stub.GetRound(
                    federation_pb2.GetRoundRequest(
                        known_round_id=round_id, known_stage=status.stage, wait_ms=2000
                    )
                )
            index = status.client_index
            params = SecAggParams.from_bytes(status.parameters)
            checkin = await stub.GetStageResult(
                federation_pb2.StageResultRequest(round_id=round_id, stage=common_pb2.STAGE_CHECK_IN)
            )
            holders = NeighbourGraph(params).holders(index)
            keys = {
                i: pki.verify_device_certificate(
                    checkin.peer_certificates[i], ca_certificate_pem=h.ca_pem, now=dt.datetime.now(dt.UTC)
                ).identity_public_key
                for i in holders
            }
            client = SecAggClient(
                params=params,
                client_id=index,
                identity_key=attacker.identity_key().to_signing_handle(),
                identity_keys=keys,
            )
            other = next(i for i in holders if i != index)

            def msg(payload: bytes, round_: int = round_id, request_id: str | None = None) -> Any:
                return federation_pb2.StageMessage(
                    request_id=request_id or rid(), round_id=round_, payload=payload
                )

            # Out of order: shares and unmasking before keys were advertised.
            await expect(grpc.StatusCode.FAILED_PRECONDITION, stub.ShareKeys(msg(b"\x01")))
            await expect(grpc.StatusCode.FAILED_PRECONDITION, stub.Unmask(msg(b"\x01")))
            # Malformed payloads and an empty one.
            await expect(grpc.StatusCode.INVALID_ARGUMENT, stub.AdvertiseKeys(msg(os.urandom(200))))
            await expect(grpc.StatusCode.INVALID_ARGUMENT, stub.AdvertiseKeys(msg(b"")))
            # Oversized: over the payload limit, and over the transport's message limit.
            await expect(grpc.StatusCode.RESOURCE_EXHAUSTED, stub.AdvertiseKeys(msg(b"\x00" * (100 * 1024))))
            await expect(grpc.StatusCode.RESOURCE_EXHAUSTED, stub.AdvertiseKeys(msg(b"\x00" * (300 * 1024))))
            # Claiming another participant's identity inside the message.
            forged = AdvertiseKeys(params.round_id, other, os.urandom(32), os.urandom(32), os.urandom(64))
            msg_text = await expect(
                grpc.StatusCode.PERMISSION_DENIED, stub.AdvertiseKeys(msg(forged.to_bytes()))
            )
            assert msg_text == "not a participant of this stage"
            # A key set not signed by this device's identity key.
            unsigned = AdvertiseKeys(params.round_id, index, os.urandom(32), os.urandom(32), os.urandom(64))
            await expect(grpc.StatusCode.INVALID_ARGUMENT, stub.AdvertiseKeys(msg(unsigned.to_bytes())))
            # A round id that is not the current round.
            good = client.advertise_keys().to_bytes()
            await expect(
                grpc.StatusCode.FAILED_PRECONDITION, stub.AdvertiseKeys(msg(good, round_=round_id + 7))
            )
            # Now the real message; a retry with the same request id gets the stored answer and a different
            # body under that id is refused.
            first_id = rid()
            ack = await stub.AdvertiseKeys(msg(good, request_id=first_id))
            assert not ack.replayed
            again = await stub.AdvertiseKeys(msg(good, request_id=first_id))
            assert again.replayed and again.round_id == round_id
            await expect(
                grpc.StatusCode.ALREADY_EXISTS, stub.AdvertiseKeys(msg(good + b"\x00", request_id=first_id))
            )

            await _wait(stub, round_id, common_pb2.STAGE_SHARE_KEYS)
            await expect(grpc.StatusCode.FAILED_PRECONDITION, stub.AdvertiseKeys(msg(good)))  # stage is over
            result = await stub.GetStageResult(
                federation_pb2.StageResultRequest(round_id=round_id, stage=common_pb2.STAGE_ADVERTISE_KEYS)
            )
            shares = client.share_keys(KeysBroadcast.from_bytes(result.payload))
            await stub.ShareKeys(msg(shares.to_bytes()))

            await _wait(stub, round_id, common_pb2.STAGE_MASKED_INPUT)
            result = await stub.GetStageResult(
                federation_pb2.StageResultRequest(round_id=round_id, stage=common_pb2.STAGE_SHARE_KEYS)
            )
            masked = client.masked_input(
                SharesBroadcast.from_bytes(result.payload), update=np.zeros(DIM), weight=1
            )
            payload = masked.to_bytes()
            half = len(payload) // 2

            def chunk(i: int, count: int, data: bytes, total: int, request_id: str) -> Any:
                return federation_pb2.MaskedInputChunk(
                    request_id=request_id,
                    round_id=round_id,
                    index=i,
                    count=count,
                    total_bytes=total,
                    data=data,
                )

            upload_id = rid()
            # Chunks out of order, a total over the limit, and a stream shorter than announced.
            await expect(
                grpc.StatusCode.INVALID_ARGUMENT,
                stub.UploadMaskedInput(
                    _chunks(
                        [
                            chunk(1, 2, payload[half:], len(payload), upload_id),
                            chunk(0, 2, payload[:half], len(payload), upload_id),
                        ]
                    )
                ),
            )
            await expect(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                stub.UploadMaskedInput(_chunks([chunk(0, 1, payload, 10 * len(payload), upload_id)])),
            )
            await expect(
                grpc.StatusCode.INVALID_ARGUMENT,
                stub.UploadMaskedInput(_chunks([chunk(0, 2, payload[:half], len(payload), upload_id)])),
            )
            ok = [
                chunk(0, 2, payload[:half], len(payload), upload_id),
                chunk(1, 2, payload[half:], len(payload), upload_id),
            ]
            assert not (await stub.UploadMaskedInput(_chunks(ok))).replayed
            assert (await stub.UploadMaskedInput(_chunks(ok))).replayed

            await _wait(stub, round_id, common_pb2.STAGE_UNMASK)
            result = await stub.GetStageResult(
                federation_pb2.StageResultRequest(round_id=round_id, stage=common_pb2.STAGE_MASKED_INPUT)
            )
            reply = client.unmask(UnmaskRequest.from_bytes(result.payload))
            await stub.Unmask(msg(reply.to_bytes()))
            outcomes = await asyncio.gather(*honest_tasks)
            # Replaying a message of the finished round is refused.
            await expect(grpc.StatusCode.FAILED_PRECONDITION, stub.AdvertiseKeys(msg(good)))
            await expect(grpc.StatusCode.FAILED_PRECONDITION, stub.Unmask(msg(reply.to_bytes())))
        assert [o.status for o in outcomes] == ["published"] * 3
        assert {o.model_version for o in outcomes} == {"2"}
        registry = ModelRegistry(h.storage)
        before = registry.get(1).arrays["w"].astype(np.float64)
        after = registry.get(2).arrays["w"].astype(np.float64)
        all_updates = [*updates[:3], np.zeros(DIM)]
        all_weights = [*weights[:3], 1]
        oracle = sum(w * np.clip(u, -1, 1) for u, w in zip(all_updates, all_weights, strict=True)) / sum(
            all_weights
        )
        assert np.max(np.abs(after - (before + oracle))) < 1e-4

    run(tmp_path, settings, body)


async def _wait(stub: Any, round_id: int, stage: int) -> None:
    known = common_pb2.STAGE_UNSPECIFIED
    for _ in range(200):
        status = await stub.GetRound(
            federation_pb2.GetRoundRequest(known_round_id=round_id, known_stage=known, wait_ms=2000)
        )
        if status.stage == stage:
            return
        assert status.stage not in (common_pb2.STAGE_ABORTED, common_pb2.STAGE_FINISHED), status
        known = status.stage
    raise AssertionError("stage never reached")
