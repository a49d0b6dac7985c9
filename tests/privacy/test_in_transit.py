"""In transit: everything a device sends is protocol messages over pinned, mutually authenticated TLS.

Threat model: a network observer, an impostor aggregator and an impostor device. The observer must see only
TLS; a plaintext connection to the aggregator is refused, and so is a TLS client without a device
certificate (or with one from another CA). The device refuses an impostor with a certificate from another
CA, and also one with a certificate from the *same* CA (another server identity, or a device's
certificate): the aggregator's certificate is pinned at enrollment. And even the genuine aggregator, which
terminates TLS, must receive nothing but protocol messages: no field large enough or shaped like a feature,
no label, no plaintext update, no private key, and no call metadata beyond what the protocol defines (none).

Every outgoing call of real devices (enrollment, model download and a whole SecAgg round, driven by the
``FederationClient`` and ``enroll``) against a real in-process aggregator over loopback TLS is recorded --
request messages and call metadata -- by gRPC client interceptors passed through the production channel
factories' ``interceptors`` seam (:mod:`fedfer.agent.federation.channel`). The devices' updates are real
one-step updates of ``v`` whose first coordinates are proportional to the frames' features (the first layer's
gradient is ``delta x^T``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from fedfer.agent.federation.client import FederationClient
from fedfer.agent.federation.enroll import enroll
from fedfer.agent.federation.retry import RetryPolicy
from fedfer.agent.federation.state import DeviceState
from fedfer.agent.records import CLASS_SETS
from fedfer.aggregator.config import load_config, read_certificate_authority
from fedfer.aggregator.enrollment import issue_token
from fedfer.aggregator.rounds import RoundSettings
from fedfer.security import pki
from fedfer.security.keys import IdentityKey
from fedfer.v1 import federation_pb2, federation_pb2_grpc
from tests.integration.federation_harness import DIM, Harness, run_in_process
from tests.privacy.attacks import sgd_update
from tests.privacy.conftest import Population

DEVICES = 3
CHI2_LIMIT_255 = 420.0
LARGE_BYTES = 2048  # a 1,280-d float16 feature is 2,560 bytes
ALLOWED_METADATA: frozenset[str] = frozenset()  # the protocol defines no call metadata


@dataclasses.dataclass(frozen=True)
class Call:
    """One outgoing call as the device's channel issued it."""

    method: str
    request: Message
    metadata: tuple[tuple[str, str | bytes], ...]


class _Recorder:
    """Shared log of every call (request message and metadata) a device's channels sent."""

    def __init__(self) -> None:
        self.sent: list[Call] = []

    def interceptors(self) -> list[Any]:
        return [_UnaryUnary(self), _UnaryStream(self), _StreamUnary(self)]

    def note(self, details: Any, request: Message) -> None:
        method = details.method.decode() if isinstance(details.method, bytes) else str(details.method)
        metadata = tuple((str(k), v) for k, v in (details.metadata or ()))
        self.sent.append(Call(method, request, metadata))


class _Tap:
    """Records the request of a unary-request call, then makes it."""

    def __init__(self, recorder: _Recorder) -> None:
        self.recorder = recorder

    async def _record(self, continuation: Any, details: Any, request: Any) -> Any:
        self.recorder.note(details, request)
        return await continuation(details, request)


# grpc.aio files an interceptor under one call type only, so each type gets its own class.
class _UnaryUnary(_Tap, grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    intercept_unary_unary = _Tap._record


class _UnaryStream(_Tap, grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[misc]
    intercept_unary_stream = _Tap._record


class _StreamUnary(grpc.aio.StreamUnaryClientInterceptor):  # type: ignore[misc]
    def __init__(self, recorder: _Recorder) -> None:
        self.recorder = recorder

    async def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        async def tap() -> AsyncIterator[Any]:
            if hasattr(requests, "__aiter__"):
                async for item in requests:
                    self.recorder.note(details, item)
                    yield item
            else:
                for item in requests:
                    self.recorder.note(details, item)
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


@dataclasses.dataclass
class Inspection:
    """What the inspection of a list of recorded calls found."""

    problems: list[str] = dataclasses.field(default_factory=list)
    float_fields: set[str] = dataclasses.field(default_factory=set)
    large_fields: dict[str, int] = dataclasses.field(default_factory=dict)
    message_types: set[str] = dataclasses.field(default_factory=set)
    metadata_keys: set[str] = dataclasses.field(default_factory=set)
    total_bytes: int = 0


def _inspect(calls: list[Call], needles: list[bytes]) -> Inspection:
    """Check recorded calls: only fedfer.v1 messages; nothing feature-like, labelled, secret; no metadata."""
    class_names = {name for names in CLASS_SETS.values() for name in names}
    found = Inspection()

    def text_problem(where: str, value: str) -> None:
        if any(c in value.lower() for c in class_names):
            found.problems.append(f"{where} names an expression class")
        if "PRIVATE KEY" in value:
            found.problems.append(f"{where} carries a private key")

    for call in calls:
        name = call.request.DESCRIPTOR.full_name
        found.message_types.add(f"{call.method} {name}")
        if not name.startswith("fedfer.v1."):
            found.problems.append(f"non-protocol message {name}")
        wire = call.request.SerializeToString()
        found.total_bytes += len(wire)
        if any(n in wire for n in needles):
            found.problems.append(f"{name} carries the bytes of a feature or update")
        for key, value in call.metadata:
            found.metadata_keys.add(key)
            if key not in ALLOWED_METADATA:
                found.problems.append(f"{call.method} sends metadata {key!r} the protocol does not define")
            raw = value if isinstance(value, bytes) else value.encode()
            if any(n in raw for n in needles):
                found.problems.append(f"metadata {key!r} carries the bytes of a feature or update")
            text_problem(f"metadata {key!r}", raw.decode("latin-1"))
        for path, descriptor, value in _fields(call.request):
            if descriptor.type in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
                found.float_fields.add(path)
            if descriptor.type == FieldDescriptor.TYPE_STRING:
                text_problem(path, value)
            if descriptor.type == FieldDescriptor.TYPE_BYTES:
                text_problem(path, value.decode("latin-1"))
                if len(value) > LARGE_BYTES:
                    found.large_fields[path] = max(found.large_fields.get(path, 0), len(value))
                    if _chi2(value) > CHI2_LIMIT_255:
                        found.problems.append(f"{path} ({len(value)} bytes) is not uniform")
    return found


def test_the_inspection_catches_leaky_requests(population: Population) -> None:
    """The checks have teeth: features, labels, a plain update, a private key or metadata are all flagged."""
    clips, _ = population.pool
    feature = clips[0, 0]
    update = np.linspace(-0.01, 0.01, DIM)
    key_pem = pki.TlsPrivateKey.generate().dangerously_export_pem()
    quiet = federation_pb2.GetRoundRequest()
    leaky = [
        Call("/x", federation_pb2.StageMessage(payload=feature.astype(np.float16).tobytes()), ()),
        Call("/x", federation_pb2.StageMessage(request_id="label=happiness"), ()),
        Call("/x", federation_pb2.MaskedInputChunk(data=update.astype(np.float32).tobytes()), ()),
        Call("/x", federation_pb2.StageMessage(payload=key_pem), ()),
        Call("/x", quiet, (("x-round-hint", "1"),)),
        Call("/x", quiet, (("x-trace-bin", feature.astype(np.float32).tobytes()),)),
    ]
    for call in leaky:
        assert _inspect([call], _needles([feature, update])).problems, call
    clean = [Call("/x", federation_pb2.MaskedInputChunk(data=os.urandom(8192)), ()), Call("/x", quiet, ())]
    assert not _inspect(clean, []).problems


def _real_updates(population: Population) -> tuple[list[npt.NDArray[np.float64]], list[np.ndarray]]:
    """Each device's update (first DIM coordinates of a real update of v, scaled) and every secret vector."""
    clips, labels = population.pool
    updates: list[npt.NDArray[np.float64]] = []
    secrets: list[np.ndarray] = []
    for i in range(DEVICES):
        batch = slice(4 * i, 4 * i + 4)
        update = sgd_update(population.model, clips[batch], labels[batch], lr=0.01)
        updates.append(update["frame.0.weight"].ravel()[:DIM].astype(np.float64) * 50.0)
        secrets.extend(clips[batch].reshape(-1, clips.shape[-1]))
    secrets.extend(u for u in updates)
    return updates, secrets


async def _enroll_recorded(h: Harness, name: str, recorder: _Recorder) -> DeviceState:
    """Enroll over the production enrollment channel with the recorder's interceptors installed."""
    return await enroll(
        server=f"127.0.0.1:{h.server.enroll_port}",
        ca_pem=h.ca_pem,
        token=issue_token(h.storage, now=dt.datetime.now(dt.UTC)).token,
        state_dir=h.root / name,
        interceptors=recorder.interceptors(),
    )


def test_devices_send_only_protocol_messages(tmp_path: Path, population: Population, audit_report) -> None:
    """Enrollment, model download and a whole round: only fedfer.v1 messages, no metadata, nothing secret."""
    recorders = [_Recorder() for _ in range(DEVICES)]
    updates, secrets = _real_updates(population)
    # Generous stage deadlines: on a loaded machine a slow device must not be dropped as a straggler.
    settings = RoundSettings(
        min_clients=DEVICES, max_clients=DEVICES, degree=0, rounds=1,
        advertise_s=60.0, share_s=60.0, masked_s=60.0, unmask_s=60.0,
    )  # fmt: skip
    outcomes: list[Any] = []

    async def body(h: Harness) -> None:
        states = [await _enroll_recorded(h, f"dev{i}", recorders[i]) for i in range(DEVICES)]

        async def device(i: int) -> Any:
            async with FederationClient(state=states[i], interceptors=recorders[i].interceptors()) as client:

                async def update_fn(base: str, dim: int) -> tuple[npt.NDArray[np.float64], int]:
                    await client.fetch_model(base)  # as the agent's `join` does before personalizing
                    return updates[i], 4

                return await client.join_round(update_fn, timeout_s=240)

        outcomes.extend(await asyncio.gather(*(device(i) for i in range(DEVICES))))

    run_in_process(tmp_path, settings, body)
    assert [o.status for o in outcomes] == ["published"] * DEVICES

    calls = [c for recorder in recorders for c in recorder.sent]
    methods = {c.method.rsplit("/", 1)[-1] for c in calls}
    # Every kind of call a device makes went through the recording seam, enrollment included.
    assert {"Enroll", "GetManifest", "DownloadModel", "JoinRound", "AdvertiseKeys", "ShareKeys",
            "UploadMaskedInput", "Unmask"} <= methods, methods  # fmt: skip
    found = _inspect(calls, _needles(secrets))
    audit_report.record(
        "in_transit_round",
        devices=DEVICES,
        requests=len(calls),
        request_bytes=found.total_bytes,
        methods=sorted(methods),
        message_types=sorted(found.message_types),
        large_bytes_fields=found.large_fields,
        float_fields=sorted(found.float_fields),
        metadata_keys=sorted(found.metadata_keys),
        problems=found.problems,
    )
    assert not found.problems, found.problems
    assert not found.float_fields, found.float_fields
    assert not found.metadata_keys, found.metadata_keys
    # The only large payload is the masked vector (uniform mod 2^k, checked above).
    assert set(found.large_fields) <= {"MaskedInputChunk.data"}, found.large_fields


async def _refused_by_aggregator(target: str, credentials: grpc.ChannelCredentials | None) -> str:
    """The status a GetRound call gets over ``credentials`` (``None``: plaintext); "OK" if it got through."""
    channel = (
        grpc.aio.insecure_channel(target)
        if credentials is None
        else grpc.aio.secure_channel(target, credentials)
    )
    async with channel:
        try:
            await federation_pb2_grpc.FederationStub(channel).GetRound(
                federation_pb2.GetRoundRequest(), timeout=5
            )
        except grpc.aio.AioRpcError as exc:
            return str(exc.code().name)
    return "OK"


@contextlib.asynccontextmanager
async def _impostor(creds: pki.ServerCredentials) -> AsyncIterator[int]:
    """A gRPC server on loopback presenting ``creds``, with no real service behind it; yields its port."""
    server = grpc.aio.server()
    port = server.add_secure_port(
        "127.0.0.1:0",
        grpc.ssl_server_credentials([(creds.private_key.dangerously_export_pem(), creds.certificate_pem)]),
    )
    federation_pb2_grpc.add_FederationServicer_to_server(federation_pb2_grpc.FederationServicer(), server)
    await server.start()
    try:
        yield port
    finally:
        await server.stop(0)


async def _device_status_against(state: DeviceState, creds: pki.ServerCredentials) -> str:
    """The status the device's own client gets from an impostor server presenting ``creds``."""
    async with _impostor(creds) as port:
        fooled = dataclasses.replace(state, port=port)
        async with FederationClient(state=fooled, policy=RetryPolicy(attempts=1)) as client:
            try:
                await client.status()
            except grpc.aio.AioRpcError as exc:
                return str(exc.code().name)
        return "OK"


async def _ca_only_status_against(state: DeviceState, creds: pki.ServerCredentials) -> str:
    """What a device that trusted the whole CA (no pinning) would get from the impostor."""
    async with _impostor(creds) as port:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=state.ca_pem(),
            private_key=state.tls_key().dangerously_export_pem(),
            certificate_chain=state.certificate_pem(),
        )
        return await _refused_by_aggregator(f"{state.host}:{port}", credentials)


def _device_certificate(
    ca: pki.CertificateAuthority, device_id: str, now: dt.datetime
) -> tuple[pki.TlsPrivateKey, pki.DeviceCertificate]:
    """A fresh TLS key and a device certificate for it issued by ``ca`` (valid for a day)."""
    key = pki.TlsPrivateKey.generate()
    csr = pki.create_device_csr(device_id=device_id, tls_key=key, identity_key=IdentityKey.generate())
    return key, ca.issue_device_certificate(pki.parse_device_csr(csr), now=now, validity=dt.timedelta(days=1))


def test_plaintext_unauthenticated_clients_and_impostors_are_refused(tmp_path: Path, audit_report) -> None:
    """The aggregator refuses plaintext and certificate-less TLS; the device refuses every impostor server."""
    refused: dict[str, str] = {}

    async def body(h: Harness) -> None:
        state = await h.enroll("dev")
        target = f"127.0.0.1:{h.server.port}"
        now = dt.datetime.now(dt.UTC)
        day = dt.timedelta(days=1)
        # Clients the aggregator must refuse.
        refused["plaintext_client"] = await _refused_by_aggregator(target, None)
        refused["tls_client_without_certificate"] = await _refused_by_aggregator(
            target, grpc.ssl_channel_credentials(root_certificates=state.ca_pem())
        )
        other = pki.CertificateAuthority.create(common_name="other", now=now, validity=day)
        stranger_key, stranger = _device_certificate(other, "dev-stranger", now)
        refused["client_certificate_from_another_ca"] = await _refused_by_aggregator(
            target,
            grpc.ssl_channel_credentials(
                root_certificates=state.ca_pem(),
                private_key=stranger_key.dangerously_export_pem(),
                certificate_chain=stranger.certificate_pem,
            ),
        )
        # Control: the genuine aggregator is reachable with the device's pinned channel.
        async with FederationClient(state=state, policy=RetryPolicy(attempts=1)) as client:
            await client.status()
        refused["device_to_genuine_aggregator"] = "OK"
        # Impostor servers on loopback. Same-CA certificates name 127.0.0.1 too: only pinning stops them.
        ca = read_certificate_authority(load_config(h.root / "agg" / "aggregator.toml"))
        same_ca_server = ca.issue_server_certificate(now=now, validity=day, common_name="impostor")
        device_key, same_ca_device = _device_certificate(ca, "dev-impostor", now)
        impostors = {
            "another_ca": other.issue_server_certificate(now=now, validity=day),
            "same_ca_other_server_identity": same_ca_server,
            "same_ca_device_certificate": pki.ServerCredentials(
                private_key=device_key, certificate_pem=same_ca_device.certificate_pem
            ),
        }
        for name, creds in impostors.items():
            refused[f"device_to_impostor_{name}"] = await _device_status_against(state, creds)
        # Teeth: trusting the CA alone (what pinning replaced) lets the same-CA server impostor in.
        refused["ca_only_channel_to_same_ca_server_impostor"] = await _ca_only_status_against(
            state, same_ca_server
        )

    run_in_process(tmp_path, RoundSettings(min_clients=2, max_clients=2), body)
    audit_report.record("in_transit_refusals", **refused)
    assert refused == {
        "plaintext_client": "UNAVAILABLE",
        "tls_client_without_certificate": "UNAVAILABLE",
        "client_certificate_from_another_ca": "UNAVAILABLE",
        "device_to_genuine_aggregator": "OK",
        "device_to_impostor_another_ca": "UNAVAILABLE",
        "device_to_impostor_same_ca_other_server_identity": "UNAVAILABLE",
        "device_to_impostor_same_ca_device_certificate": "UNAVAILABLE",
        # The impostor has no real service: the handshake succeeded and the call reached it.
        "ca_only_channel_to_same_ca_server_impostor": "UNIMPLEMENTED",
    }


def test_enrollment_pins_the_aggregator_certificate(tmp_path: Path) -> None:
    """The pinned certificate is the aggregator's own, stored public (0644) beside ``ca.pem``."""

    async def body(h: Harness) -> None:
        state = await h.enroll("dev")
        config = load_config(h.root / "agg" / "aggregator.toml")
        assert state.server_pem() == config.tls.server_cert.read_bytes()
        assert (state.directory / "server.pem").stat().st_mode & 0o777 == 0o644
        assert state.server_pem() != state.ca_pem()

    run_in_process(tmp_path, RoundSettings(min_clients=2, max_clients=2), body)
