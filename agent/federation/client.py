"""The device side of federation over gRPC: fetch the central model, take part in secure-aggregation rounds.

:class:`FederationClient` drives the pure :class:`fedfer.security.secagg.client.SecAggClient` through the
stages the aggregator announces: it long-polls the round status, fetches each stage's result, feeds it to the
state machine and sends what comes back. Every mutating request carries a request id chosen once per message,
so a retry after ``UNAVAILABLE``/``DEADLINE_EXCEEDED`` (with jittered exponential backoff) is harmless; a
dropped connection is simply re-established and the round resumed where it was. Round secrets stay in memory
only.

The device sends nothing but protocol messages: its join request, its signed round keys, encrypted shares,
the masked (quantized, weighted) update and its unmasking shares. Peer identity keys are accepted only from
device certificates that verify against the pinned CA.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import grpc
import numpy as np
import numpy.typing as npt

from fedfer.agent.federation.channel import Interceptors, federation_channel
from fedfer.agent.federation.retry import RetryPolicy, call_with_retry
from fedfer.agent.federation.state import DeviceState
from fedfer.security import pki
from fedfer.security.errors import (
    FedferError,
    IntegrityError,
    ProtocolError,
    RoundAbortedError,
    ValidationError,
)
from fedfer.security.model_codec import decode_model
from fedfer.security.secagg.client import SecAggClient
from fedfer.security.secagg.graph import NeighbourGraph
from fedfer.security.secagg.messages import ConsistencyRequest, KeysBroadcast, SharesBroadcast, UnmaskRequest
from fedfer.security.secagg.params import SecAggParams
from fedfer.security.secagg.stage import Stage
from fedfer.v1 import common_pb2, federation_pb2, federation_pb2_grpc, models_pb2, models_pb2_grpc

__all__ = ["CentralModel", "FederationClient", "RoundOutcome", "WireCounter"]

_log = logging.getLogger(__name__)
T = TypeVar("T")

_LEFT_BEHIND = frozenset(
    {grpc.StatusCode.ABORTED, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.PERMISSION_DENIED}
)
_HTTP2_FRAME = 16_384
_TLS_RECORD = 16_384


def _stage(status: Any) -> Stage:
    """The stage a ``RoundStatus`` names.

    Raises:
        ProtocolError: the aggregator named no stage this device knows.
    """
    stage = Stage.from_wire(status.stage)
    if stage is None:
        raise ProtocolError("the aggregator sent an unknown round stage")
    return stage


class WireCounter:
    """Counts the bytes this device puts on the wire, per RPC and in total.

    Each request message is counted as its serialized size plus the gRPC length prefix (5 bytes), HTTP/2 DATA
    frame headers (9 bytes per 16 KiB), TLS 1.3 record overhead (22 bytes per 16 KiB record) and a fixed
    estimate of 120 bytes of HTTP/2 HEADERS per call. TCP/IP headers and the connection set-up (TLS handshake)
    are left out. ``fedfer-bench federation`` measures the real bytes with a proxy below TLS; the two agree
    within the per-call header guess (``tests/integration/test_federation_client.py``).
    """

    CALL_HEADERS = 120

    def __init__(self) -> None:
        self.total = 0
        self.payload = 0
        self.calls = 0

    def message(self, size: int) -> None:
        """Count one request message of ``size`` serialized bytes."""
        framed = size + 5
        frames = max(1, -(-framed // _HTTP2_FRAME))
        on_wire = framed + 9 * frames
        on_wire += 22 * max(1, -(-on_wire // _TLS_RECORD))
        self.total += on_wire
        self.payload += size

    def call(self) -> None:
        """Count the headers of one call."""
        self.calls += 1
        self.total += self.CALL_HEADERS


@dataclass(frozen=True)
class CentralModel:
    """One verified version of the central model ``v``.

    Attributes:
        version: registry version string.
        sha256: the digest the aggregator published (verified over manifest and bytes).
        arrays: named arrays in manifest order.
    """

    version: str
    sha256: str
    arrays: dict[str, npt.NDArray[Any]] = field(repr=False)

    def flat(self) -> npt.NDArray[np.float64]:
        """All arrays concatenated in manifest order, as one float64 vector."""
        return np.concatenate([a.astype(np.float64).ravel() for a in self.arrays.values()])


@dataclass(frozen=True)
class RoundOutcome:
    """How a round ended for this device.

    Attributes:
        round_id: the round.
        status: ``"published"``, ``"aborted"`` or ``"dropped"`` (this device's input was not used).
        model_version: the version the round published ("" unless published).
        base_version: the central model version the round's updates were relative to.
        client_index: this device's index in the round.
    """

    round_id: int
    status: str
    model_version: str
    base_version: str
    client_index: int


class _Dropped(FedferError):
    """This device missed a stage (the aggregator moved on); the round may still finish without it."""


UpdateFn = Callable[[str, int], Awaitable[tuple[npt.NDArray[np.floating[Any]], int]]]
"""Produces ``(update, weight)`` for a round, given the round's base model version and dimension."""


class FederationClient:
    """A device's connection to the aggregator (mutual TLS, pinned CA).

    Use as ``async with FederationClient(state=...) as client:``.

    Args:
        state: the enrolled device's state.
        policy: retry policy for transient failures.
        rpc_timeout_s: deadline of each unary call.
        poll_ms: how long one status long-poll may wait at the aggregator.
        chunk_bytes: size of each masked-input chunk.
        counter: optional wire-byte counter (benchmarks).
        hooks: optional callbacks by stage name, awaited right after the device's message for that stage was
            accepted (tests use them to kill a device at a precise point).
        interceptors: client interceptors for the federation channel (tests record every call with them).
    """

    def __init__(
        self,
        *,
        state: DeviceState,
        policy: RetryPolicy | None = None,
        rpc_timeout_s: float = 60.0,
        poll_ms: int = 5_000,
        chunk_bytes: int = 1 << 20,
        counter: WireCounter | None = None,
        hooks: Mapping[str, Callable[[], Awaitable[None]]] | None = None,
        interceptors: Interceptors = (),
    ) -> None:
        if not isinstance(state, DeviceState):
            raise ValidationError("state must be a DeviceState")
        if type(chunk_bytes) is not int or not 16 << 10 <= chunk_bytes <= 4 << 20:
            raise ValidationError("chunk_bytes must be an int in 16 KiB..4 MiB")
        if type(poll_ms) is not int or not 0 <= poll_ms <= 60_000:
            raise ValidationError("poll_ms must be an int in 0..60000")
        self._state = state
        self._policy = policy or RetryPolicy()
        self._timeout = float(rpc_timeout_s)
        self._poll_ms = poll_ms
        self._chunk = chunk_bytes
        self.counter = counter or WireCounter()
        self._hooks = dict(hooks or {})
        self._interceptors = tuple(interceptors)
        self.stage_deadlines: dict[Stage, int] = {}
        """Deadline (unix ms) the aggregator announced for each stage this client saw."""
        self._channel: grpc.aio.Channel | None = None
        self._fed: federation_pb2_grpc.FederationStub | None = None
        self._models: models_pb2_grpc.ModelsStub | None = None

    async def __aenter__(self) -> FederationClient:
        self._channel = federation_channel(self._state, interceptors=self._interceptors)
        self._fed = federation_pb2_grpc.FederationStub(self._channel)
        self._models = models_pb2_grpc.ModelsStub(self._channel)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._channel is not None:
            await self._channel.close()
        self._channel = self._fed = self._models = None

    def __repr__(self) -> str:
        return f"FederationClient(device_id={self._state.device_id!r}, target={self._state.target!r})"

    # -- plumbing -----------------------------------------------------------------------------------------

    @property
    def _stub(self) -> federation_pb2_grpc.FederationStub:
        if self._fed is None:
            raise ValidationError("use FederationClient as an async context manager")
        return self._fed

    async def _unary(
        self,
        what: str,
        method: Any,
        request: Any,
        *,
        timeout: float | None = None,
        until: float | None = None,
    ) -> Any:
        size = request.ByteSize()

        async def attempt() -> Any:
            self.counter.call()
            self.counter.message(size)
            return await method(request, timeout=timeout or self._timeout)

        return await call_with_retry(attempt, policy=self._policy, what=what, until=until)

    def _open_until(self, stage: Stage) -> float | None:
        """Unix time at which ``stage`` closes, as the aggregator announced it (retries help until then)."""
        deadline_ms = self.stage_deadlines.get(stage)
        return deadline_ms / 1000 if deadline_ms else None

    async def status(
        self, *, round_id: int = 0, stage: common_pb2.Stage = common_pb2.STAGE_UNSPECIFIED, wait_ms: int = 0
    ) -> Any:
        """Return the aggregator's ``RoundStatus`` (long-polling up to ``wait_ms`` for a change)."""
        request = federation_pb2.GetRoundRequest(known_round_id=round_id, known_stage=stage, wait_ms=wait_ms)
        return await self._unary(
            "status", self._stub.GetRound, request, timeout=self._timeout + wait_ms / 1000
        )

    async def _wait_stage(self, round_id: int, at_least: Stage, *, until: float) -> Any:
        """Long-poll until round ``round_id`` reaches stage ``at_least`` (or ends)."""
        known = common_pb2.STAGE_UNSPECIFIED
        while True:
            status = await self.status(round_id=round_id, stage=known, wait_ms=self._poll_ms)
            if status.round_id != round_id:
                raise RoundAbortedError("round is over")
            stage = _stage(status)
            if status.stage_deadline_unix_ms:
                self.stage_deadlines[stage] = status.stage_deadline_unix_ms
            if stage.terminal or stage.order >= at_least.order:
                return status
            if time.monotonic() > until:
                raise RoundAbortedError("gave up waiting for the round to progress")
            known = status.stage

    async def _result(self, round_id: int, stage: Stage) -> Any:
        wire_stage = cast(common_pb2.Stage, stage.value)  # the enum's value is its fedfer.v1.Stage number
        request = federation_pb2.StageResultRequest(round_id=round_id, stage=wire_stage)
        return await self._unary("stage result", self._stub.GetStageResult, request)

    async def _send(self, what: str, method: Any, round_id: int, payload: bytes, stage: Stage) -> None:
        request = federation_pb2.StageMessage(
            request_id=str(uuid.uuid4()), round_id=round_id, payload=payload
        )
        await self._accepted(self._unary(what, method, request, until=self._open_until(stage)))

    async def _accepted(self, call: Awaitable[T]) -> T:
        """Await a stage submission; a stage that already closed means this device dropped out."""
        try:
            return await call
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.PERMISSION_DENIED):
                raise _Dropped("the aggregator closed the stage without this device") from exc
            if exc.code() is grpc.StatusCode.ABORTED:
                raise RoundAbortedError("round aborted") from exc
            raise

    async def _upload(self, round_id: int, payload: bytes) -> None:
        request_id = str(uuid.uuid4())
        count = max(1, -(-len(payload) // self._chunk))
        chunks = [
            federation_pb2.MaskedInputChunk(
                request_id=request_id,
                round_id=round_id,
                index=i,
                count=count,
                total_bytes=len(payload),
                data=payload[i * self._chunk : (i + 1) * self._chunk],
            )
            for i in range(count)
        ]

        async def attempt() -> Any:
            self.counter.call()
            for c in chunks:
                self.counter.message(c.ByteSize())

            async def stream() -> AsyncIterator[federation_pb2.MaskedInputChunk]:
                for c in chunks:
                    yield c

            return await self._stub.UploadMaskedInput(stream(), timeout=self._timeout)

        until = self._open_until(Stage.MASKED_INPUT)
        await self._accepted(call_with_retry(attempt, policy=self._policy, what="masked input", until=until))

    async def _hook(self, name: str) -> None:
        hook = self._hooks.get(name)
        if hook is not None:
            await hook()

    # -- the central model --------------------------------------------------------------------------------

    async def fetch_model(self, version: str = "") -> CentralModel:
        """Download one version of the central model (default: the latest) and verify its SHA-256.

        Raises:
            IntegrityError: the bytes or manifest do not match the published digest.
        """
        if self._models is None:
            raise ValidationError("use FederationClient as an async context manager")
        request = models_pb2.ModelRequest(version=version)
        manifest = await self._unary("manifest", self._models.GetManifest, request)
        request = models_pb2.ModelRequest(version=manifest.version)
        models = self._models

        async def attempt() -> list[Any]:
            self.counter.call()
            self.counter.message(request.ByteSize())
            return [c async for c in models.DownloadModel(request, timeout=self._timeout)]

        chunks = await call_with_retry(attempt, policy=self._policy, what="download")
        return _assemble(manifest, chunks)

    # -- rounds -------------------------------------------------------------------------------------------

    async def join_round(
        self,
        update_fn: UpdateFn,
        *,
        timeout_s: float = 600.0,
        rounds_to_try: int = 3,
    ) -> RoundOutcome:
        """Take part in the next round the aggregator opens and follow it to its end.

        Args:
            update_fn: called once the round's base model version and dimension are known; returns the
                update (delta from that version, length ``dim``) and its integer weight (example count).
            timeout_s: give up after this long.
            rounds_to_try: how many rounds to try to join when a round is full or check-in closed before
                this device got in.

        Returns:
            How the round ended for this device (``status`` is ``"published"``, ``"dropped"`` or
            ``"aborted"``).

        Raises:
            RoundAbortedError: no round could be joined in time.
        """
        until = time.monotonic() + timeout_s
        for _ in range(rounds_to_try):
            status = await self._wait_for_open_round(until)
            request = federation_pb2.JoinRoundRequest(request_id=str(uuid.uuid4()), round_id=status.round_id)
            try:
                joined = await self._unary("join", self._stub.JoinRound, request)
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.ABORTED):
                    raise
                joined = None  # check-in closed (or the round ended) before this device got in
            if joined is None or not joined.participant:
                with contextlib.suppress(RoundAbortedError, grpc.aio.AioRpcError):
                    await self._wait_stage(status.round_id, Stage.FINISHED, until=until)
                continue
            return await self._take_part(joined, update_fn, until)
        raise RoundAbortedError("could not join a round")

    async def _wait_for_open_round(self, until: float) -> Any:
        status = await self.status()
        while _stage(status) is not Stage.CHECK_IN:
            if time.monotonic() > until:
                raise RoundAbortedError("no round opened in time")
            status = await self.status(round_id=status.round_id, stage=status.stage, wait_ms=self._poll_ms)
            if _stage(status).terminal:  # the round we watched ended; look at the current one
                status = await self.status()
        return status

    async def _take_part(self, joined: Any, update_fn: UpdateFn, until: float) -> RoundOutcome:
        round_id = joined.round_id
        index = joined.client_index
        base = joined.model_version
        try:
            update, weight = await update_fn(base, joined.dim)
            status = await self._wait_stage(round_id, Stage.ADVERTISE_KEYS, until=until)
            if _stage(status) is not Stage.ADVERTISE_KEYS or not status.participant:
                raise _Dropped("not admitted to key advertisement")
            params = SecAggParams.from_bytes(status.parameters)
            if params.dim != joined.dim or status.client_index != index:
                raise IntegrityError("round parameters disagree with the announced round")
            client = await self._secagg_client(round_id, params, index)
            await self._send(
                "advertise",
                self._stub.AdvertiseKeys,
                round_id,
                client.advertise_keys().to_bytes(),
                Stage.ADVERTISE_KEYS,
            )
            await self._hook("advertise_keys")

            await self._wait_stage(round_id, Stage.SHARE_KEYS, until=until)
            keys = KeysBroadcast.from_bytes((await self._result(round_id, Stage.ADVERTISE_KEYS)).payload)
            await self._send(
                "share keys",
                self._stub.ShareKeys,
                round_id,
                client.share_keys(keys).to_bytes(),
                Stage.SHARE_KEYS,
            )
            await self._hook("share_keys")

            await self._wait_stage(round_id, Stage.MASKED_INPUT, until=until)
            shares = SharesBroadcast.from_bytes((await self._result(round_id, Stage.SHARE_KEYS)).payload)
            masked = client.masked_input(shares, update=update, weight=weight)
            await self._upload(round_id, masked.to_bytes())
            await self._hook("masked_input")

            await self._wait_stage(round_id, Stage.CONSISTENCY_CHECK, until=until)
            announced = ConsistencyRequest.from_bytes(
                (await self._result(round_id, Stage.MASKED_INPUT)).payload
            )
            await self._send(
                "consistency check",
                self._stub.ConsistencyCheck,
                round_id,
                client.consistency_check(announced).to_bytes(),
                Stage.CONSISTENCY_CHECK,
            )
            await self._hook("consistency_check")

            await self._wait_stage(round_id, Stage.UNMASK, until=until)
            request = UnmaskRequest.from_bytes(
                (await self._result(round_id, Stage.CONSISTENCY_CHECK)).payload
            )
            await self._send(
                "unmask",
                self._stub.Unmask,
                round_id,
                client.unmask(request).to_bytes(),
                Stage.UNMASK,
            )
            await self._hook("unmask")
        except _Dropped:
            _log.info("device dropped out of round %d", round_id)
        except grpc.aio.AioRpcError as exc:
            # The round moved on without this device (a stage closed, its results are not for us) or aborted.
            if exc.code() not in _LEFT_BEHIND:
                raise
            _log.info("device left round %d (%s)", round_id, exc.code().name)
        except RoundAbortedError:
            _log.info("round %d aborted", round_id)
        final = await self._wait_stage(round_id, Stage.FINISHED, until=until)
        if _stage(final) is Stage.ABORTED:
            status_text = "aborted"
        else:
            status_text = "published" if final.participant else "dropped"
        return RoundOutcome(round_id, status_text, final.model_version, base, index)

    async def _secagg_client(self, round_id: int, params: SecAggParams, index: int) -> SecAggClient:
        """Build the protocol client, with peer identity keys taken from CA-verified device certificates."""
        result = await self._result(round_id, Stage.CHECK_IN)
        ca = self._state.ca_pem()
        now = dt.datetime.now(dt.UTC)
        holders = NeighbourGraph(params).holders(index)
        identity_keys: dict[int, bytes] = {}
        devices: set[str] = set()
        for peer in holders:
            pem = result.peer_certificates.get(peer)
            if pem is None:
                raise IntegrityError("aggregator withheld a neighbour's certificate")
            identity = pki.verify_device_certificate(pem, ca_certificate_pem=ca, now=now)
            if identity.device_id in devices:
                raise IntegrityError("one device appears twice in the roster")
            devices.add(identity.device_id)
            identity_keys[peer] = identity.identity_public_key
        if pki.device_id_from_certificate(result.peer_certificates[index]) != self._state.device_id:
            raise IntegrityError("aggregator assigned this device's index to another device")
        identity_key = self._state.identity_key()
        return SecAggClient(
            params=params, client_id=index, identity_key=identity_key, identity_keys=identity_keys
        )


def _assemble(manifest: Any, chunks: list[Any]) -> CentralModel:
    """Reassemble a downloaded model and verify it against the published digest."""
    buffers: dict[str, bytearray] = {spec.name: bytearray(spec.nbytes) for spec in manifest.arrays}
    filled = dict.fromkeys(buffers, 0)
    for chunk in chunks:
        buf = buffers.get(chunk.name)
        if buf is None or chunk.offset + len(chunk.data) > len(buf):
            raise IntegrityError("model chunk does not fit the manifest")
        buf[chunk.offset : chunk.offset + len(chunk.data)] = chunk.data
        filled[chunk.name] += len(chunk.data)
    if any(filled[n] != len(b) for n, b in buffers.items()):
        raise IntegrityError("model download incomplete")
    blob = b"".join(bytes(buffers[s.name]) for s in manifest.arrays)
    arrays = decode_model(manifest.manifest_json, blob, manifest.sha256)
    if list(arrays) != [s.name for s in manifest.arrays]:
        raise IntegrityError("model manifest disagrees with its array list")
    return CentralModel(version=manifest.version, sha256=manifest.sha256, arrays=dict(arrays))
