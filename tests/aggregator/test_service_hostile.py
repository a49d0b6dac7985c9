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

from fedfer.agent.federation.client import FederationClient
from fedfer.agent.federation.enroll import enroll
from fedfer.agent.federation.retry import RetryPolicy
from fedfer.agent.federation.state import DeviceState
from fedfer.aggregator.enrollment import issue_token
from fedfer.aggregator.registry import ModelRegistry
from fedfer.aggregator.rounds import RoundSettings
from fedfer.security import pki
from fedfer.security.keys import IdentityKey
from fedfer.security.secagg.client import SecAggClient
from fedfer.security.secagg.graph import NeighbourGraph
from fedfer.security.secagg.messages import (
    AdvertiseKeys,
    ConsistencyRequest,
    KeysBroadcast,
    SharesBroadcast,
    UnmaskRequest,
)
from fedfer.security.secagg.params import SecAggParams
from fedfer.v1 import (
    common_pb2,
    enrollment_pb2,
    enrollment_pb2_grpc,
    federation_pb2,
    federation_pb2_grpc,
)
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
        private_key=key_pem if key_pem is not None else state.tls_key().dangerously_export_pem(),
        certificate_chain=cert_pem if cert_pem is not None else state.certificate_pem(),
    )
    return grpc.aio.secure_channel(state.target, creds)


def rid() -> str:
    return str(uuid.uuid4())


FAST = RetryPolicy(attempts=1)


def round_settings(*, clients: int, rounds: int = 1, share_s: float = 60.0) -> RoundSettings:
    """Rounds of exactly ``clients`` devices, complete graph, generous deadlines (``share_s`` aside)."""
    return RoundSettings(min_clients=clients, max_clients=clients, degree=0, checkin_s=5.0, advertise_s=60.0,
                         share_s=share_s, masked_s=60.0, unmask_s=60.0, rounds=rounds)  # fmt: skip


async def refused_transports(h: Harness, state: DeviceState) -> None:
    """No client certificate, plaintext, a foreign-CA certificate for ``state``'s id: each refused."""
    stub_for = federation_pb2_grpc.FederationStub
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
    foreign = pki.CertificateAuthority.create(common_name="foreign", now=now, validity=dt.timedelta(days=1))
    tls_key, identity = pki.TlsPrivateKey.generate(), IdentityKey.generate()
    csr = pki.parse_device_csr(
        pki.create_device_csr(device_id=state.device_id, tls_key=tls_key, identity_key=identity)
    )
    forged = foreign.issue_device_certificate(csr, now=now, validity=dt.timedelta(days=1))
    async with mtls_channel(
        state, cert_pem=forged.certificate_pem, key_pem=tls_key.dangerously_export_pem()
    ) as ch:
        await expect(
            grpc.StatusCode.UNAVAILABLE,
            stub_for(ch).GetRound(federation_pb2.GetRoundRequest(), timeout=5),
        )


def test_transport_level_rejections(tmp_path: Path) -> None:
    settings = RoundSettings(min_clients=2, max_clients=4)

    async def body(h: Harness) -> None:
        state = await h.enroll("good")
        stub_for = federation_pb2_grpc.FederationStub
        enroll_target = f"127.0.0.1:{h.server.enroll_port}"
        # A registered device over mutual TLS is served.
        async with mtls_channel(state) as ch:
            status = await stub_for(ch).GetRound(federation_pb2.GetRoundRequest(), timeout=10)
            assert status.stage in (common_pb2.STAGE_IDLE, common_pb2.STAGE_CHECK_IN)
        await refused_transports(h, state)
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
    settings = round_settings(clients=4)
    rng = np.random.default_rng(11)
    updates = [rng.normal(0, 0.3, DIM) for _ in range(4)]
    weights = [3, 5, 7, 11]

    async def body(h: Harness) -> None:
        states = [await h.enroll(f"dev{i}") for i in range(4)]
        honest_states, attacker = states[:3], states[3]

        honest_tasks = [
            asyncio.create_task(_honest(honest_states[i], updates[i], weights[i])) for i in range(3)
        ]
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
                identity_key=attacker.identity_key(),
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
            forged = AdvertiseKeys(
                params.round_id, other, os.urandom(32), os.urandom(32), os.urandom(32), os.urandom(64)
            )
            msg_text = await expect(
                grpc.StatusCode.PERMISSION_DENIED, stub.AdvertiseKeys(msg(forged.to_bytes()))
            )
            assert msg_text == "not a participant of this stage"
            # A key set not signed by this device's identity key.
            unsigned = AdvertiseKeys(
                params.round_id, index, os.urandom(32), os.urandom(32), os.urandom(32), os.urandom(64)
            )
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

            await _wait(stub, round_id, common_pb2.STAGE_CONSISTENCY_CHECK)
            result = await stub.GetStageResult(
                federation_pb2.StageResultRequest(round_id=round_id, stage=common_pb2.STAGE_MASKED_INPUT)
            )
            signed = client.consistency_check(ConsistencyRequest.from_bytes(result.payload))
            await stub.ConsistencyCheck(msg(signed.to_bytes()))
            await _wait(stub, round_id, common_pb2.STAGE_UNMASK)
            result = await stub.GetStageResult(
                federation_pb2.StageResultRequest(round_id=round_id, stage=common_pb2.STAGE_CONSISTENCY_CHECK)
            )
            reply = client.unmask(UnmaskRequest.from_bytes(result.payload))
            await stub.Unmask(msg(reply.to_bytes()))
            outcomes = [rounds[0] for rounds in await asyncio.gather(*honest_tasks)]
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


def _oracle_published(h: Harness, version: int, updates: list[Any], weights: list[int]) -> None:
    """Model ``version`` is its parent plus the plaintext FedAvg of the clipped updates."""
    registry = ModelRegistry(h.storage)
    model = registry.get(version)
    assert model.parent is not None
    got = model.arrays["w"].astype(np.float64) - registry.get(model.parent).arrays["w"].astype(np.float64)
    oracle = sum(w * np.clip(u, -1, 1) for u, w in zip(updates, weights, strict=True)) / sum(weights)
    assert np.max(np.abs(got - oracle)) < 1e-4


async def _honest(
    state: DeviceState, update: Any, weight: int, *, rounds: int = 1, hooks: dict[str, Any] | None = None
) -> list[Any]:
    """An honest device (the real federation client) taking part in ``rounds`` rounds."""

    async def update_fn(base: str, dim: int) -> tuple[npt.NDArray[np.float64], int]:
        return update, weight

    async with FederationClient(state=state, poll_ms=2000, hooks=hooks, policy=RetryPolicy(attempts=3)) as c:
        return [await c.join_round(update_fn, timeout_s=100) for _ in range(rounds)]


def test_transport_rejections_and_a_revocation_mid_round_leave_the_honest_round_intact(
    tmp_path: Path,
) -> None:
    settings = round_settings(clients=4, share_s=4.0)  # closes soon after the revoked device goes silent
    rng = np.random.default_rng(21)
    updates = [rng.normal(0, 0.3, DIM) for _ in range(4)]
    weights = [2, 3, 5, 7]

    async def body(h: Harness) -> None:
        states = [await h.enroll(f"dev{i}") for i in range(4)]
        honest, revokee = states[:3], states[3]
        attacked = asyncio.Event()

        async def attack() -> None:  # honest device 0's share keys were accepted: the round is running
            await refused_transports(h, honest[0])
            attacked.set()

        async def revoke() -> None:  # the revokee advertised its keys; it is revoked before sharing them
            h.enrollment.revoke(revokee.device_id)

        results = await asyncio.gather(
            _honest(honest[0], updates[0], weights[0], hooks={"share_keys": attack}),
            _honest(honest[1], updates[1], weights[1]),
            _honest(honest[2], updates[2], weights[2]),
            _honest(revokee, updates[3], weights[3], hooks={"advertise_keys": revoke}),
            return_exceptions=True,
        )
        assert attacked.is_set()
        *outcomes, refused = results
        assert [o[0].status for o in outcomes] == ["published"] * 3  # type: ignore[index]
        assert isinstance(refused, grpc.aio.AioRpcError)
        assert (refused.code(), refused.details()) == (
            grpc.StatusCode.PERMISSION_DENIED,
            "device is not authorized",
        )
        (record,) = h.storage.list_rounds()
        assert record.status.key == "published" and list(record.participants) == sorted(
            s.device_id for s in honest
        )
        _oracle_published(h, 2, updates[:3], weights[:3])

    run(tmp_path, settings, body)


class RawDevice:
    """A participant driven by hand over raw stubs (mutual TLS) that keeps every stage request it sent."""

    def __init__(self, h: Harness, state: DeviceState, stub: Any) -> None:
        self.h, self.state, self.stub = h, state, stub
        self.sent: dict[int, dict[int, Any]] = {}
        self.index: dict[int, int] = {}  # round id -> this device's client index in it
        self._rpc = {
            common_pb2.STAGE_ADVERTISE_KEYS: stub.AdvertiseKeys,
            common_pb2.STAGE_SHARE_KEYS: stub.ShareKeys,
            common_pb2.STAGE_CONSISTENCY_CHECK: stub.ConsistencyCheck,
            common_pb2.STAGE_UNMASK: stub.Unmask,
        }

    def request(self, stage: int, round_id: int, payload: bytes) -> Any:
        """A fresh request (new request id) carrying ``payload`` for ``stage`` of ``round_id``."""
        if stage == common_pb2.STAGE_MASKED_INPUT:
            return [
                federation_pb2.MaskedInputChunk(
                    request_id=rid(),
                    round_id=round_id,
                    index=0,
                    count=1,
                    total_bytes=len(payload),
                    data=payload,
                )
            ]
        return federation_pb2.StageMessage(request_id=rid(), round_id=round_id, payload=payload)

    async def send(self, stage: int, request: Any) -> Any:
        """Send one stage request as it is (a retry or a replay sends the same object again)."""
        if stage == common_pb2.STAGE_MASKED_INPUT:
            return await self.stub.UploadMaskedInput(_chunks(request), timeout=10)
        return await self._rpc[stage](request, timeout=10)

    async def run_round(self, update: Any, weight: int, before: Any = None) -> int:
        """Join the next round and take part honestly; ``before(stage, round_id)`` runs before each send."""
        status = await self.stub.GetRound(federation_pb2.GetRoundRequest(), timeout=10)
        while status.stage != common_pb2.STAGE_CHECK_IN:
            status = await self.stub.GetRound(
                federation_pb2.GetRoundRequest(
                    known_round_id=status.round_id, known_stage=status.stage, wait_ms=2000
                )
            )
        round_id = status.round_id
        joined = await self.stub.JoinRound(
            federation_pb2.JoinRoundRequest(request_id=rid(), round_id=round_id)
        )
        assert joined.participant
        await _wait(self.stub, round_id, common_pb2.STAGE_ADVERTISE_KEYS)
        status = await self.stub.GetRound(federation_pb2.GetRoundRequest(), timeout=10)
        params, index = SecAggParams.from_bytes(status.parameters), status.client_index
        self.index[round_id] = index
        checkin = await self.stub.GetStageResult(
            federation_pb2.StageResultRequest(round_id=round_id, stage=common_pb2.STAGE_CHECK_IN)
        )
        now = dt.datetime.now(dt.UTC)
        keys = {
            i: pki.verify_device_certificate(
                pem, ca_certificate_pem=self.h.ca_pem, now=now
            ).identity_public_key
            for i, pem in checkin.peer_certificates.items()
        }
        client = SecAggClient(
            params=params,
            client_id=index,
            identity_key=self.state.identity_key(),
            identity_keys=keys,
        )
        build = {
            common_pb2.STAGE_SHARE_KEYS: lambda p: client.share_keys(KeysBroadcast.from_bytes(p)),
            common_pb2.STAGE_MASKED_INPUT: lambda p: client.masked_input(
                SharesBroadcast.from_bytes(p), update=update, weight=weight
            ),
            common_pb2.STAGE_CONSISTENCY_CHECK: lambda p: client.consistency_check(
                ConsistencyRequest.from_bytes(p)
            ),
            common_pb2.STAGE_UNMASK: lambda p: client.unmask(UnmaskRequest.from_bytes(p)),
        }
        previous = common_pb2.STAGE_ADVERTISE_KEYS
        for stage in STAGES:
            await _wait(self.stub, round_id, stage)
            if stage == common_pb2.STAGE_ADVERTISE_KEYS:
                payload = client.advertise_keys().to_bytes()
            else:
                result = await self.stub.GetStageResult(
                    federation_pb2.StageResultRequest(round_id=round_id, stage=previous)
                )
                payload = build[stage](result.payload).to_bytes()
                previous = stage
            if before is not None:
                await before(stage, round_id)
            request = self.request(stage, round_id, payload)
            assert not (await self.send(stage, request)).replayed
            self.sent.setdefault(round_id, {})[stage] = request
        return round_id


STAGES = (
    common_pb2.STAGE_ADVERTISE_KEYS,
    common_pb2.STAGE_SHARE_KEYS,
    common_pb2.STAGE_MASKED_INPUT,
    common_pb2.STAGE_CONSISTENCY_CHECK,
    common_pb2.STAGE_UNMASK,
)


def _payload(request: Any) -> bytes:
    return b"".join(c.data for c in request) if isinstance(request, list) else bytes(request.payload)


def test_replays_of_an_earlier_round_are_refused_while_a_later_round_runs(tmp_path: Path) -> None:
    settings = round_settings(clients=3, rounds=2)
    rng = np.random.default_rng(22)
    updates = [rng.normal(0, 0.3, DIM) for _ in range(3)]
    weights = [3, 4, 6]

    async def body(h: Harness) -> None:
        states = [await h.enroll(f"dev{i}") for i in range(3)]
        honest = [asyncio.create_task(_honest(states[i], updates[i], weights[i], rounds=2)) for i in range(2)]
        refusals: list[tuple[int, grpc.StatusCode]] = []
        async with mtls_channel(states[2]) as ch:
            raw = RawDevice(h, states[2], federation_pb2_grpc.FederationStub(ch))
            first = await raw.run_round(updates[2], weights[2])

            async def replay(stage: int, round_id: int) -> None:
                assert round_id != first
                old = raw.sent[first][stage]
                # The very request of round 1 (its request id has a stored answer): refused, not "replayed".
                msg = await expect(grpc.StatusCode.FAILED_PRECONDITION, raw.send(stage, old))
                assert msg == "not the current round"
                # Its payload relabelled with the current round under a fresh request id: it names the client
                # index the device had in round 1 (another participant's, unless it got the same), and it is
                # bound to round 1's protocol round id, which the protocol rejects.
                relabelled = raw.request(stage, round_id, _payload(old))
                if raw.index[first] != raw.index[round_id]:
                    msg = await expect(grpc.StatusCode.PERMISSION_DENIED, raw.send(stage, relabelled))
                    assert msg == "not a participant of this stage"
                else:
                    await expect(grpc.StatusCode.INVALID_ARGUMENT, raw.send(stage, relabelled))
                refusals.append((stage, grpc.StatusCode.FAILED_PRECONDITION))

            # Watching round 1 to its end, then polling with its outcome, moves the device on to the next one.
            watched = common_pb2.STAGE_UNMASK
            while watched == common_pb2.STAGE_UNMASK:
                status = await raw.stub.GetRound(
                    federation_pb2.GetRoundRequest(known_round_id=first, known_stage=watched, wait_ms=2000),
                    timeout=10,
                )
                assert status.round_id == first
                watched = status.stage
            assert watched == common_pb2.STAGE_FINISHED and status.model_version == "2"
            status = await raw.stub.GetRound(
                federation_pb2.GetRoundRequest(known_round_id=first, known_stage=watched, wait_ms=2000),
                timeout=10,
            )
            assert status.round_id != first
            second = await raw.run_round(updates[2], weights[2], before=replay)
        outcomes = await asyncio.gather(*honest)
        assert [stage for stage, _ in refusals] == list(STAGES)  # a replay tried in every stage
        assert [[o.status for o in device] for device in outcomes] == [["published"] * 2] * 2
        for round_id, version in ((first, 2), (second, 3)):
            record = h.storage.get_round(round_id)
            assert record is not None and (record.status.key, record.model_version) == (
                "published",
                version,
            )
            assert list(record.participants) == sorted(s.device_id for s in states)
            _oracle_published(h, version, updates, weights)

    run(tmp_path, settings, body)


def test_enrolling_a_taken_id_is_answered_like_a_bad_token_and_spends_the_token(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        taken = (await h.enroll("first")).device_id

        def request(token: str, device_id: str) -> Any:
            csr = pki.create_device_csr(
                device_id=device_id,
                tls_key=pki.TlsPrivateKey.generate(),
                identity_key=IdentityKey.generate(),
            )
            return enrollment_pb2.EnrollRequest(request_id=rid(), token=token, csr_pem=csr)

        token = issue_token(h.storage, now=dt.datetime.now(dt.UTC)).token
        creds = grpc.ssl_channel_credentials(h.ca_pem)
        async with grpc.aio.secure_channel(f"127.0.0.1:{h.server.enroll_port}", creds) as ch:
            stub = enrollment_pb2_grpc.EnrollmentStub(ch)
            answers = []
            # A taken id with a good token, a free id with a bad token, then the good token again (spent by
            # the first attempt) with a free id: one answer for all three, so nothing tells which ids exist.
            for tok, device_id in (
                (token, taken),
                (pki.new_enrollment_token(), "dev-free"),
                (token, "dev-free"),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.Enroll(request(tok, device_id), timeout=10)
                answers.append((info.value.code(), info.value.details()))
            assert answers == [(grpc.StatusCode.PERMISSION_DENIED, "enrollment refused")] * 3
            fresh = issue_token(h.storage, now=dt.datetime.now(dt.UTC)).token
            assert (await stub.Enroll(request(fresh, "dev-free"), timeout=10)).device_id == "dev-free"
        assert sorted(d.device_id for d in h.storage.list_devices()) == sorted([taken, "dev-free"])

    run(tmp_path, RoundSettings(min_clients=2, max_clients=2), body)
