"""In transit: everything a device sends is protocol messages over pinned, mutually authenticated TLS.

Threat model: a network observer or an impostor aggregator. The observer must see only TLS; a plaintext
connection to the aggregator is refused; an impostor with a certificate from another CA is refused by the
device. And even the genuine aggregator, which terminates TLS, must receive nothing but protocol messages:
no field large enough or shaped like a feature, no label, no plaintext update.

Every outgoing request of real devices (H3's ``FederationClient`` driving H1's SecAgg client) in a real round
against a real in-process aggregator over loopback TLS is recorded by a gRPC client interceptor installed on
the device's channel. The devices' updates are real one-step updates of ``v`` whose first coordinates are
proportional to the frames' features (the first layer's gradient is ``delta x^T``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
import pytest
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

import agent.federation.client as federation_client
from agent.attacks import sgd_update
from agent.federation.channel import channel_options
from agent.federation.client import FederationClient
from agent.federation.retry import RetryPolicy
from agent.federation.state import DeviceState
from agent.models import CLASS_SETS
from aggregator.rounds import RoundSettings
from protos.fedfer.v1 import federation_pb2, federation_pb2_grpc
from security import pki
from tests.integration.federation_harness import DIM, Harness, run_in_process
from tests.privacy.conftest import Population

DEVICES = 3
CHI2_LIMIT_255 = 420.0
LARGE_BYTES = 2048  # a 1,280-d float16 feature is 2,560 bytes


class _Recorder:
    """Shared log of every request message a device's channel sent."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, Message]] = []

    def interceptors(self) -> list[Any]:
        return [_UnaryUnary(self), _StreamUnary(self)]


class _UnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    def __init__(self, recorder: _Recorder) -> None:
        self.recorder = recorder

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        self.recorder.sent.append((details.method.decode() if isinstance(details.method, bytes)
                                   else str(details.method), request))  # fmt: skip
        return await continuation(details, request)


class _StreamUnary(grpc.aio.StreamUnaryClientInterceptor):  # type: ignore[misc]
    def __init__(self, recorder: _Recorder) -> None:
        self.recorder = recorder

    async def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        method = details.method.decode() if isinstance(details.method, bytes) else str(details.method)

        async def tap() -> AsyncIterator[Any]:
            if hasattr(requests, "__aiter__"):
                async for item in requests:
                    self.recorder.sent.append((method, item))
                    yield item
            else:
                for item in requests:
                    self.recorder.sent.append((method, item))
                    yield item

        return await continuation(details, tap())


def _fields(message: Message) -> list[tuple[str, FieldDescriptor, Any]]:
    """Every set field of ``message`` and its sub-messages: (path, descriptor, value)."""
    out: list[tuple[str, FieldDescriptor, Any]] = []
    for descriptor, value in message.ListFields():
        path = f"{message.DESCRIPTOR.name}.{descriptor.name}"
        items = list(value) if descriptor.is_repeated else [value]
        if descriptor.type == FieldDescriptor.TYPE_MESSAGE:
            for item in items:
                out.extend(_fields(item))
        else:
            out.append((path, descriptor, value))
    return out


def _chi2(data: bytes) -> float:
    counts = np.bincount(np.frombuffer(data, dtype=np.uint8), minlength=256)
    expected = len(data) / 256
    return float(np.sum((counts - expected) ** 2 / expected))


def _needles(vectors: list[np.ndarray]) -> list[bytes]:
    out = []
    for v in vectors:
        for dtype in ("<f2", "<f4", "<f8"):
            raw = np.asarray(v).astype(dtype).tobytes()
            mid = len(raw) // 2
            out.append(raw[mid - 16 : mid + 16])
    return out


def _inspect(
    messages: list[tuple[str, Message]], needles: list[bytes]
) -> tuple[list[str], list[str], dict[str, int], set[str], int]:
    """Check recorded requests: (problems, float fields, large bytes fields, message types, total bytes)."""
    class_names = {name for names in CLASS_SETS.values() for name in names}
    message_types: set[str] = set()
    large_fields: dict[str, int] = {}
    float_fields: list[str] = []
    problems: list[str] = []
    total_bytes = 0
    for method, message in messages:
        name = message.DESCRIPTOR.full_name
        message_types.add(f"{method} {name}")
        if not name.startswith("fedfer.v1."):
            problems.append(f"non-protocol message {name}")
        wire = message.SerializeToString()
        total_bytes += len(wire)
        if any(n in wire for n in needles):
            problems.append(f"{name} carries the bytes of a feature or update")
        for path, descriptor, value in _fields(message):
            if descriptor.type in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
                float_fields.append(path)
            if descriptor.type == FieldDescriptor.TYPE_STRING and any(
                c in value.lower() for c in class_names
            ):
                problems.append(f"{path} names an expression class")
            if descriptor.type == FieldDescriptor.TYPE_BYTES and len(value) > LARGE_BYTES:
                large_fields[path] = max(large_fields.get(path, 0), len(value))
                if _chi2(value) > CHI2_LIMIT_255:
                    problems.append(f"{path} ({len(value)} bytes) is not uniform")
    return problems, float_fields, large_fields, message_types, total_bytes


def test_the_inspection_catches_leaky_requests(population: Population) -> None:
    """The checks have teeth: plaintext features, labels or a plain update in a request are all flagged."""
    clips, _ = population.pool
    feature = clips[0, 0]
    update = np.linspace(-0.01, 0.01, DIM)
    leaky = [
        ("/x", federation_pb2.StageMessage(payload=feature.astype(np.float16).tobytes())),
        ("/x", federation_pb2.StageMessage(request_id="label=happiness")),
        ("/x", federation_pb2.MaskedInputChunk(data=update.astype(np.float32).tobytes())),
    ]
    for message in leaky:
        problems, *_ = _inspect([message], _needles([feature, update]))
        assert problems, message[1].DESCRIPTOR.name
    problems, *_ = _inspect([("/x", federation_pb2.MaskedInputChunk(data=os.urandom(8192)))], [])
    assert not problems


def test_devices_send_only_protocol_messages(
    tmp_path: Path, population: Population, audit_report, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A whole round: every outgoing request is a fedfer.v1 message; nothing feature-like or labelled."""
    recorders = [_Recorder() for _ in range(DEVICES)]
    by_target: dict[str, _Recorder] = {}

    def recording_channel(state: DeviceState) -> grpc.aio.Channel:
        creds = grpc.ssl_channel_credentials(
            root_certificates=state.ca_pem(),
            private_key=state.tls_key().unsafe_export_pem(),
            certificate_chain=state.certificate_pem(),
        )
        return grpc.aio.secure_channel(
            state.target,
            creds,
            options=channel_options(),
            interceptors=by_target[state.device_id].interceptors(),
        )

    monkeypatch.setattr(federation_client, "federation_channel", recording_channel)
    clips, labels = population.pool
    updates: list[npt.NDArray[np.float64]] = []
    secrets: list[np.ndarray] = []
    for i in range(DEVICES):
        batch = slice(4 * i, 4 * i + 4)
        update = sgd_update(population.model, clips[batch], labels[batch], lr=0.01)
        updates.append(update["frame.0.weight"].ravel()[:DIM].astype(np.float64) * 50.0)
        secrets.extend(clips[batch].reshape(-1, clips.shape[-1]))
    secrets.extend(u for u in updates)
    # Generous stage deadlines: on a loaded machine a slow device must not be dropped as a straggler.
    settings = RoundSettings(
        min_clients=DEVICES, max_clients=DEVICES, degree=0, rounds=1,
        advertise_s=60.0, share_s=60.0, masked_s=60.0, unmask_s=60.0,
    )  # fmt: skip
    outcomes: list[Any] = []

    async def body(h: Harness) -> None:
        states = [await h.enroll(f"dev{i}") for i in range(DEVICES)]
        for state, recorder in zip(states, recorders, strict=True):
            by_target[state.device_id] = recorder

        async def device(i: int) -> Any:
            async def update_fn(base: str, dim: int) -> tuple[npt.NDArray[np.float64], int]:
                return updates[i], 4

            async with FederationClient(state=states[i]) as client:
                return await client.join_round(update_fn, timeout_s=240)

        outcomes.extend(await asyncio.gather(*(device(i) for i in range(DEVICES))))

    run_in_process(tmp_path, settings, body)
    assert [o.status for o in outcomes] == ["published"] * DEVICES

    messages = [m for recorder in recorders for m in recorder.sent]
    assert all(recorder.sent for recorder in recorders), "the interceptor saw no request"
    problems, float_fields, large_fields, message_types, total_bytes = _inspect(messages, _needles(secrets))
    audit_report.record(
        "in_transit_round",
        devices=DEVICES,
        requests=sum(len(r.sent) for r in recorders),
        request_bytes=total_bytes,
        message_types=sorted(message_types),
        large_bytes_fields=large_fields,
        float_fields=sorted(set(float_fields)),
        problems=problems,
    )
    assert not problems, problems
    assert not float_fields, float_fields
    # The only large payload is the masked vector (uniform mod 2^k, checked above).
    assert set(large_fields) <= {"MaskedInputChunk.data"}, large_fields


def test_plaintext_and_foreign_ca_are_refused(tmp_path: Path, audit_report) -> None:
    """A plaintext client is refused by the aggregator; a device refuses an aggregator from another CA."""
    refused: dict[str, str] = {}

    async def body(h: Harness) -> None:
        state = await h.enroll("dev")
        async with grpc.aio.insecure_channel(f"127.0.0.1:{h.server.port}") as channel:
            stub = federation_pb2_grpc.FederationStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.GetRound(federation_pb2.GetRoundRequest(), timeout=5)
            refused["plaintext_to_aggregator"] = info.value.code().name
        # Control: the genuine aggregator is reachable with the device's pinned channel.
        async with FederationClient(state=state, policy=RetryPolicy(attempts=1)) as client:
            await client.status()
        # An impostor on loopback with a valid-looking certificate issued by another CA.
        now = dt.datetime.now(dt.UTC)
        other = pki.CertificateAuthority.create(
            common_name="impostor", now=now, validity=dt.timedelta(days=1)
        )
        creds = other.issue_server_certificate(now=now, validity=dt.timedelta(days=1))
        impostor = grpc.aio.server()
        port = impostor.add_secure_port(
            "127.0.0.1:0",
            grpc.ssl_server_credentials([(creds.private_key.unsafe_export_pem(), creds.certificate_pem)]),
        )
        await impostor.start()
        try:
            fooled = dataclasses.replace(state, port=port)
            async with FederationClient(state=fooled, policy=RetryPolicy(attempts=1)) as client:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await client.status()
            refused["device_to_foreign_ca_server"] = info.value.code().name
        finally:
            await impostor.stop(0)

    run_in_process(tmp_path, RoundSettings(min_clients=2, max_clients=2), body)
    audit_report.record("in_transit_refusals", **refused)
    assert refused == {
        "plaintext_to_aggregator": "UNAVAILABLE",
        "device_to_foreign_ca_server": "UNAVAILABLE",
    }
