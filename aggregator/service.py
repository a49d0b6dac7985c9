"""The gRPC servicers of ``fedfer.v1``: the edge where requests are authenticated, validated and answered.

Everything a device sends is checked here before it reaches the round coordinator: the peer's identity comes
only from the verified client certificate in the TLS auth context (never from a request field); the device
must be registered, not revoked and present the certificate registered for it (checked on every call); the
connection must be TLS 1.3; request ids, round ids and sizes are validated; idempotent replays get the stored
answer. Errors become gRPC status codes with fixed, sanitized messages (see :func:`status_for`); nothing from
a payload or a key is ever echoed back.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn, TypeAlias, TypeVar, cast

import grpc
from google.protobuf.message import DecodeError, Message

from fedfer.aggregator.enrollment import (
    AuthenticationError,
    EnrollmentService,
    TokenRejectedError,
)
from fedfer.aggregator.registry import ModelRegistry, ModelVersion
from fedfer.aggregator.rounds import (
    DuplicateSubmissionError,
    NotLeaderError,
    NotParticipantError,
    RoundCoordinator,
    RoundView,
    StageError,
    StaleRoundError,
)
from fedfer.aggregator.storage import (
    ConflictError,
    NotFoundError,
    Storage,
    StorageCorruptError,
    StorageFullError,
    StorageUnavailableError,
)
from fedfer.security.errors import (
    FedferError,
    IntegrityError,
    ProtocolError,
    RoundAbortedError,
    ValidationError,
)
from fedfer.security.secagg.server import DuplicateMessageError
from fedfer.security.secagg.stage import Stage
from fedfer.v1 import (
    common_pb2,
    enrollment_pb2,
    federation_pb2,
    models_pb2,
)

__all__ = [
    "EdgeLimits",
    "EnrollmentRpc",
    "FederationRpc",
    "ModelsRpc",
    "OversizeError",
    "RpcRejection",
    "authenticate",
    "status_for",
]

_log = logging.getLogger(__name__)
T = TypeVar("T")
M = TypeVar("M", bound=Message)

_REQUEST_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_MAX_ROUND_ID = 2**63 - 1
_MODEL_CHUNK = 512 * 1024
_MAX_WAIT_MS = 30_000
_MAX_TOKEN = 256
_MAX_CSR = 16 * 1024

# Stages whose close gives a device something to fetch (the round goes on with a collecting stage).
_RESULT_STAGES = frozenset(s for s in Stage if s.following is not None and s.following.collecting)

Context: TypeAlias = Any
"""``grpc.aio.ServicerContext`` (grpc ships no type information)."""


class RpcRejection(FedferError):
    """A request refused at the edge with a specific gRPC status and a fixed, sanitized message."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class OversizeError(ValidationError):
    """A message or upload exceeds the configured size limit."""


class EdgeLimits:
    """Size limits enforced at the edge: per port, per method, per upload.

    The enrollment port (no client certificate yet) receives at most :attr:`enrollment_port_bytes` per
    message, enough for an enrollment (a token and a CSR of at most 16 KiB); gRPC refuses anything longer
    before it is buffered whole. On both ports a request body reaches a servicer as bytes and is parsed only
    after the peer was authenticated (a verified, registered device certificate; for ``Enroll``, TLS 1.3) and
    its size checked against its method's limit (:meth:`request_limit`): ``RESOURCE_EXHAUSTED``.

    Args:
        max_message_bytes: cap on any message the federation port receives (it receives at most the largest
            of its methods' limits, see :attr:`federation_port_bytes`).
        max_payload_bytes: largest stage payload (share keys, unmask) and largest upload chunk.
        max_upload_bytes: largest whole masked-input upload.
        max_clients: most devices in a round (sizes the share-keys and unmask limits).
        min_chunk_bytes: an upload of N bytes may use at most ``max(8, ceil(N / min_chunk_bytes))`` chunks.
    """

    ENROLLMENT_PORT_BYTES = 32 * 1024
    ENROLL_REQUEST_BYTES = 20 * 1024
    SMALL_REQUEST_BYTES = 4096
    _HEADER = 1024  # request id, round id and protobuf framing around a payload
    _SHARE_RECORD = 200  # bytes per neighbour in a share-keys payload (two ciphertexts and two ids)
    _UNMASK_RECORD = 40  # bytes per neighbour in an unmask payload (an id and a key)
    _FEW_CHUNKS = 8  # any upload may be split this far, however small
    _SMALL = (
        "GetRound",
        "JoinRound",
        "GetStageResult",
        "AdvertiseKeys",
        "ConsistencyCheck",
        "GetManifest",
        "DownloadModel",
    )

    def __init__(
        self,
        *,
        max_message_bytes: int,
        max_payload_bytes: int,
        max_upload_bytes: int,
        max_clients: int = 1000,
        min_chunk_bytes: int = 16 * 1024,
    ) -> None:
        for name, value in (
            ("max_message_bytes", max_message_bytes),
            ("max_payload_bytes", max_payload_bytes),
            ("max_upload_bytes", max_upload_bytes),
            ("min_chunk_bytes", min_chunk_bytes),
        ):
            if type(value) is not int or value < 1024:
                raise ValidationError(f"{name} must be an int >= 1024")
        if max_payload_bytes > max_message_bytes:
            raise ValidationError("max_payload_bytes must not exceed max_message_bytes")
        if type(max_clients) is not int or max_clients < 2:
            raise ValidationError("max_clients must be an int >= 2")
        self.max_message_bytes = max_message_bytes
        self.max_payload_bytes = max_payload_bytes
        self.max_upload_bytes = max_upload_bytes
        self.max_clients = max_clients
        self.min_chunk_bytes = min_chunk_bytes
        share = min(max_payload_bytes, self._HEADER + self._SHARE_RECORD * max_clients)
        unmask = min(max_payload_bytes, self._HEADER + self._UNMASK_RECORD * max_clients)
        self._limits = {
            "Enroll": self.ENROLL_REQUEST_BYTES,
            "ShareKeys": self._HEADER + share,
            "Unmask": self._HEADER + unmask,
            "UploadMaskedInput": self._HEADER + max_payload_bytes,
        } | dict.fromkeys(self._SMALL, self.SMALL_REQUEST_BYTES)

    @classmethod
    def for_dimension(
        cls, *, dim: int, max_message_bytes: int = 4 << 20, max_clients: int = 1000
    ) -> EdgeLimits:
        """Limits for updates of ``dim`` parameters: an upload may hold 8 bytes per element + 64 KiB."""
        payload = min(max_message_bytes - 4096, 2 << 20)
        return cls(
            max_message_bytes=max_message_bytes,
            max_payload_bytes=payload,
            max_upload_bytes=8 * (dim + 1) + 65536,
            max_clients=max_clients,
        )

    def request_limit(self, method: str) -> int:
        """Largest serialized request (or upload chunk) ``method`` accepts."""
        return self._limits[method]

    @property
    def federation_port_bytes(self) -> int:
        """The federation port's gRPC receive limit: the largest of its methods' limits (capped)."""
        return min(self.max_message_bytes, max(v for k, v in self._limits.items() if k != "Enroll"))

    @property
    def enrollment_port_bytes(self) -> int:
        """The enrollment port's gRPC receive limit."""
        return self.ENROLLMENT_PORT_BYTES

    def max_chunks(self, total_bytes: int) -> int:
        """Most chunks an upload of ``total_bytes`` may use (so a stream of tiny chunks cannot keep the server
        busy: the work per upload stays proportional to its size)."""
        return max(self._FEW_CHUNKS, -(-total_bytes // self.min_chunk_bytes))

    def __repr__(self) -> str:
        return (
            f"EdgeLimits(max_message_bytes={self.max_message_bytes}, "
            f"max_payload_bytes={self.max_payload_bytes}, max_upload_bytes={self.max_upload_bytes}, "
            f"max_clients={self.max_clients})"
        )


def parse_request(raw: bytes, message_type: type[M], limit: int) -> M:
    """Parse a request body that arrived as bytes (call only once the peer is authenticated).

    Raises:
        OversizeError: longer than ``limit`` bytes (not parsed).
        ValidationError: not a valid ``message_type``.
    """
    if type(raw) is not bytes:
        raise ValidationError("malformed request")
    if len(raw) > limit:
        raise OversizeError("request too large")
    try:
        return message_type.FromString(raw)
    except DecodeError:
        raise ValidationError("malformed request") from None


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """Map an exception raised while serving a request to a gRPC status and a sanitized message.

    The message is fixed per error kind, so it never carries request data or secrets.
    """
    if isinstance(exc, RpcRejection):
        return exc.code, exc.message
    table: tuple[tuple[type[BaseException], grpc.StatusCode, str], ...] = (
        (NotLeaderError, grpc.StatusCode.UNAVAILABLE, "not the active aggregator, retry"),
        (StorageFullError, grpc.StatusCode.UNAVAILABLE, "aggregator storage is full, retry later"),
        (StorageUnavailableError, grpc.StatusCode.UNAVAILABLE, "aggregator storage unavailable, retry later"),
        (StorageCorruptError, grpc.StatusCode.DATA_LOSS, "aggregator storage is damaged"),
        (OversizeError, grpc.StatusCode.RESOURCE_EXHAUSTED, "message too large"),
        (AuthenticationError, grpc.StatusCode.PERMISSION_DENIED, "device is not authorized"),
        (TokenRejectedError, grpc.StatusCode.PERMISSION_DENIED, "enrollment refused"),
        (RoundAbortedError, grpc.StatusCode.ABORTED, "round aborted"),
        (StaleRoundError, grpc.StatusCode.FAILED_PRECONDITION, "not the current round"),
        (StageError, grpc.StatusCode.FAILED_PRECONDITION, "wrong stage for this message"),
        (NotParticipantError, grpc.StatusCode.PERMISSION_DENIED, "not a participant of this stage"),
        (
            DuplicateSubmissionError,
            grpc.StatusCode.ALREADY_EXISTS,
            "a different message was already accepted",
        ),
        (DuplicateMessageError, grpc.StatusCode.ALREADY_EXISTS, "a different message was already accepted"),
        (ConflictError, grpc.StatusCode.ALREADY_EXISTS, "request id already used for a different request"),
        (NotFoundError, grpc.StatusCode.NOT_FOUND, "not found"),
        (IntegrityError, grpc.StatusCode.INVALID_ARGUMENT, "message failed verification"),
        (ValidationError, grpc.StatusCode.INVALID_ARGUMENT, "malformed message"),
        (ProtocolError, grpc.StatusCode.INVALID_ARGUMENT, "message rejected by the protocol"),
    )
    for kind, code, message in table:
        if isinstance(exc, kind):
            return code, message
    return grpc.StatusCode.INTERNAL, "internal error"


async def _abort(context: Context, exc: BaseException) -> NoReturn:
    code, message = status_for(exc)
    if code is grpc.StatusCode.INTERNAL:
        _log.error("internal error while serving a request", exc_info=exc)
    elif isinstance(exc, StorageUnavailableError | StorageCorruptError):
        _log.warning("request refused: %s", exc)  # the operator's problem: say what storage reported
    else:
        _log.info("rejected request: %s (%s)", code.name, type(exc).__name__)
    await context.abort(code, message)
    raise RuntimeError("unreachable: context.abort raises")  # pragma: no cover


async def _guard(context: Context, work: Callable[[], Awaitable[T]]) -> T:
    """Run ``work`` and turn every failure into a gRPC status (the one place errors are mapped)."""
    try:
        return await work()
    except grpc.aio.AbortError:
        raise
    except Exception as exc:  # the edge maps everything, including unexpected failures, to a status
        await _abort(context, exc)


def authenticate(context: Context, enrollment: EnrollmentService) -> tuple[str, bytes]:
    """Return the caller's device id and certificate, taken only from its verified TLS client certificate.

    Raises:
        RpcRejection: UNAUTHENTICATED without TLS 1.3 or without a client certificate.
        AuthenticationError: the certificate does not identify a registered device in good standing (not the
            registered certificate, revoked, expired, or from another CA).
    """
    auth = context.auth_context()
    if auth.get("transport_security_type") != [b"ssl"] or auth.get("ssl_tls_version") != [b"TLSv1.3"]:
        raise RpcRejection(grpc.StatusCode.UNAUTHENTICATED, "TLS 1.3 required")
    pems = auth.get("x509_pem_cert")
    if not pems:
        raise RpcRejection(grpc.StatusCode.UNAUTHENTICATED, "client certificate required")
    record = enrollment.authenticate(pems[0])
    return record.device_id, pems[0]


def _check_request_id(request_id: str) -> None:
    if _REQUEST_ID.fullmatch(request_id) is None:
        raise ValidationError("request_id must be a lower-case UUID string")


def _check_round_id(round_id: int) -> None:
    if not 0 < round_id <= _MAX_ROUND_ID:
        raise ValidationError("round_id out of range")


def _digest(*parts: bytes) -> bytes:
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return h.digest()


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _wire(stage: Stage) -> common_pb2.Stage:
    """``stage`` as the generated code types it: its value is its ``fedfer.v1.Stage`` number."""
    return cast(common_pb2.Stage, stage.value)


def _round_status(view: RoundView) -> federation_pb2.RoundStatus:
    return federation_pb2.RoundStatus(
        round_id=view.round_id,
        stage=_wire(view.stage),
        model_version=view.model_version,
        dim=view.dim,
        stage_deadline_unix_ms=view.deadline_unix_ms,
        participant=view.participant,
        completed=[_wire(s) for s in view.completed],
        parameters=view.parameters,
        latest_model_version=view.latest_model_version,
        detail=view.detail,
        client_index=view.client_index,
    )


class FederationRpc:
    """Serves the round stages to authenticated devices and forwards accepted messages to the coordinator.

    Every method receives its request as bytes (:func:`register`): the caller is authenticated first, then
    the body is size-checked and parsed.

    Only the leading replica answers; a standby refuses every call with ``UNAVAILABLE`` (devices retry, and a
    balancer that follows the health service sends them to the leader).

    Args:
        storage: the deployment's storage (idempotency records).
        enrollment: authenticates peers (device registry, revocation).
        coordinator: the round orchestrator.
        limits: size limits.
    """

    def __init__(
        self,
        *,
        storage: Storage,
        enrollment: EnrollmentService,
        coordinator: RoundCoordinator,
        limits: EdgeLimits,
    ) -> None:
        self._storage = storage
        self._enrollment = enrollment
        self._coordinator = coordinator
        self._limits = limits

    def _caller(self, context: Context) -> tuple[str, bytes]:
        """Authenticate the caller, then make sure this replica leads (else ``NotLeaderError``)."""
        caller = authenticate(context, self._enrollment)
        if not self._coordinator.is_leader:
            raise NotLeaderError("standby")
        return caller

    def _parse(self, raw: bytes, message_type: type[M], method: str) -> M:
        return parse_request(raw, message_type, self._limits.request_limit(method))

    async def GetRound(self, raw: bytes, context: Context) -> federation_pb2.RoundStatus:
        """Return the round as the calling device sees it, long-polling up to ``wait_ms`` for a change."""

        async def work() -> federation_pb2.RoundStatus:
            device_id, _ = self._caller(context)
            request = self._parse(raw, federation_pb2.GetRoundRequest, "GetRound")
            if request.known_round_id > _MAX_ROUND_ID or request.wait_ms > _MAX_WAIT_MS:
                raise ValidationError("bad poll parameters")
            known_stage = Stage.from_wire(request.known_stage)
            if request.wait_ms and known_stage is not None:
                await self._coordinator.wait_for_change(
                    round_id=request.known_round_id, stage=known_stage, timeout_s=request.wait_ms / 1000
                )
                device_id, _ = self._caller(context)  # revocation or a lost lease may have happened meanwhile
            view = self._coordinator.view(
                device_id, known_round_id=request.known_round_id, known_stage=known_stage
            )
            return _round_status(view)

        return await _guard(context, work)

    async def JoinRound(self, raw: bytes, context: Context) -> federation_pb2.RoundStatus:
        """Admit the calling device to the open round (check-in); idempotent."""

        async def work() -> federation_pb2.RoundStatus:
            device_id, certificate = self._caller(context)
            request = self._parse(raw, federation_pb2.JoinRoundRequest, "JoinRound")
            _check_request_id(request.request_id)
            _check_round_id(request.round_id)
            view = self._coordinator.join(
                device_id=device_id, round_id=request.round_id, certificate_pem=certificate
            )
            return _round_status(view)

        return await _guard(context, work)

    async def _stage_message(
        self, stage: Stage, method: str, raw: bytes, context: Context
    ) -> common_pb2.StageAck:
        async def work() -> common_pb2.StageAck:
            device_id, _ = self._caller(context)
            request = self._parse(raw, federation_pb2.StageMessage, method)
            _check_request_id(request.request_id)
            _check_round_id(request.round_id)
            if len(request.payload) > self._limits.max_payload_bytes:
                raise OversizeError("payload too large")
            if not request.payload:
                raise ValidationError("empty payload")
            return self._idempotent(device_id, stage, request.request_id, request.round_id, request.payload)

        return await _guard(context, work)

    def _idempotent(
        self, device_id: str, stage: Stage, request_id: str, round_id: int, payload: bytes
    ) -> common_pb2.StageAck:
        if not self._coordinator.is_leader:  # the lease may have gone while a long upload streamed in
            raise NotLeaderError("standby")
        # A message of an earlier round is refused even when its request id has a stored answer: replaying
        # it while a later round runs must not look accepted.
        self._coordinator.check_round(round_id)
        scope = f"{device_id}/{stage.key}"
        digest = _digest(stage.key.encode(), round_id.to_bytes(8, "big"), payload)
        stored = self._storage.get_response(scope=scope, request_id=request_id)
        if stored is not None:
            if stored.request_digest != digest:
                raise ConflictError("request id reused")
            ack = common_pb2.StageAck.FromString(stored.response)
            ack.replayed = True
            return ack
        accepted = self._coordinator.submit(
            device_id=device_id, round_id=round_id, stage=stage, payload=payload
        )
        ack = common_pb2.StageAck(request_id=request_id, round_id=round_id, stage=_wire(stage))
        if not accepted:
            # A repeat of the accepted message under a fresh request id: answered, but not recorded again,
            # so retries cannot grow the idempotency table (the first acceptance's record is the one kept).
            return ack
        record = self._storage.record_response(
            scope=scope,
            request_id=request_id,
            request_digest=digest,
            response=ack.SerializeToString(),
            now=_now(),
        )
        return common_pb2.StageAck.FromString(record.response)

    async def AdvertiseKeys(self, raw: bytes, context: Context) -> common_pb2.StageAck:
        """Accept the device's signed round public keys and seed commitment."""
        return await self._stage_message(Stage.ADVERTISE_KEYS, "AdvertiseKeys", raw, context)

    async def ShareKeys(self, raw: bytes, context: Context) -> common_pb2.StageAck:
        """Accept the device's encrypted shares."""
        return await self._stage_message(Stage.SHARE_KEYS, "ShareKeys", raw, context)

    async def ConsistencyCheck(self, raw: bytes, context: Context) -> common_pb2.StageAck:
        """Accept the device's signature over the announced survivor set."""
        return await self._stage_message(Stage.CONSISTENCY_CHECK, "ConsistencyCheck", raw, context)

    async def Unmask(self, raw: bytes, context: Context) -> common_pb2.StageAck:
        """Accept the device's own seed share and the keys that open the shares it was dealt."""
        return await self._stage_message(Stage.UNMASK, "Unmask", raw, context)

    async def UploadMaskedInput(
        self, raw_chunks: AsyncIterator[bytes], context: Context
    ) -> common_pb2.StageAck:
        """Accept the device's masked input as an ordered stream of chunks (at most
        :meth:`EdgeLimits.max_chunks` of them)."""

        async def work() -> common_pb2.StageAck:
            device_id, _ = self._caller(context)
            first: federation_pb2.MaskedInputChunk | None = None
            parts: list[bytes] = []
            received = 0
            async for raw in raw_chunks:
                chunk = self._parse(raw, federation_pb2.MaskedInputChunk, "UploadMaskedInput")
                if first is None:
                    first = chunk
                    _check_request_id(chunk.request_id)
                    _check_round_id(chunk.round_id)
                    if not 0 < chunk.total_bytes <= self._limits.max_upload_bytes:
                        raise OversizeError("upload too large")
                    if not 0 < chunk.count <= self._limits.max_chunks(chunk.total_bytes):
                        raise ValidationError("bad chunk count")
                elif (chunk.request_id, chunk.round_id, chunk.count, chunk.total_bytes) != (
                    first.request_id,
                    first.round_id,
                    first.count,
                    first.total_bytes,
                ):
                    raise ValidationError("chunk header changed within one upload")
                if chunk.index != len(parts) or chunk.index >= first.count:
                    raise ValidationError("chunk out of order")
                if len(chunk.data) > self._limits.max_payload_bytes:
                    raise OversizeError("chunk too large")
                received += len(chunk.data)
                if received > first.total_bytes:
                    raise OversizeError("upload longer than announced")
                parts.append(chunk.data)
            if first is None or len(parts) != first.count or received != first.total_bytes:
                raise ValidationError("incomplete upload")
            return self._idempotent(
                device_id, Stage.MASKED_INPUT, first.request_id, first.round_id, b"".join(parts)
            )

        return await _guard(context, work)

    async def GetStageResult(self, raw: bytes, context: Context) -> federation_pb2.StageResult:
        """Return what the aggregator sent this device when the requested stage closed."""

        async def work() -> federation_pb2.StageResult:
            device_id, _ = self._caller(context)
            request = self._parse(raw, federation_pb2.StageResultRequest, "GetStageResult")
            _check_round_id(request.round_id)
            stage = Stage.from_wire(request.stage)
            if stage not in _RESULT_STAGES:
                raise ValidationError("no results for this stage")
            payload, certificates = self._coordinator.stage_result(
                device_id=device_id, round_id=request.round_id, stage=stage
            )
            return federation_pb2.StageResult(
                round_id=request.round_id,
                stage=request.stage,
                payload=payload,
                peer_certificates=certificates,
            )

        return await _guard(context, work)


def model_manifest(model: ModelVersion) -> models_pb2.ModelManifest:
    """Build the manifest message of a verified registry version (arrays in manifest order)."""
    specs = [
        models_pb2.ArraySpec(name=name, dtype="float32", shape=list(array.shape), nbytes=int(array.nbytes))
        for name, array in sorted(model.arrays.items())
    ]
    return models_pb2.ModelManifest(
        version=str(model.version),
        parent="" if model.parent is None else str(model.parent),
        arrays=specs,
        sha256=model.digest,
        total_bytes=len(model.blob),
        manifest_json=model.manifest,
    )


class ModelsRpc:
    """Serves verified versions of the central model ``v`` to authenticated devices (requests as bytes,
    parsed after authentication).

    Args:
        enrollment: authenticates peers.
        registry: the model registry.
        limits: size limits.
    """

    def __init__(self, *, enrollment: EnrollmentService, registry: ModelRegistry, limits: EdgeLimits) -> None:
        self._enrollment = enrollment
        self._registry = registry
        self._limits = limits

    def _model(self, request: models_pb2.ModelRequest) -> ModelVersion:
        if request.version == "":
            latest = self._registry.versions()
            if not latest:
                raise NotFoundError("no model published")
            return self._get(latest[-1])
        if not request.version.isdigit() or len(request.version) > 18:
            raise ValidationError("bad model version")
        return self._get(int(request.version))

    def _get(self, version: int) -> ModelVersion:
        try:
            return self._registry.get(version)
        except IntegrityError as exc:  # our stored copy is corrupt: not the caller's fault
            raise RpcRejection(grpc.StatusCode.DATA_LOSS, "stored model failed its integrity check") from exc

    async def GetManifest(self, raw: bytes, context: Context) -> models_pb2.ModelManifest:
        """Return the manifest (named arrays, SHA-256) of one model version."""

        async def work() -> models_pb2.ModelManifest:
            authenticate(context, self._enrollment)
            request = parse_request(raw, models_pb2.ModelRequest, self._limits.request_limit("GetManifest"))
            return model_manifest(self._model(request))

        return await _guard(context, work)

    async def DownloadModel(self, raw: bytes, context: Context) -> AsyncIterator[models_pb2.ModelChunk]:
        """Stream the raw bytes of one model version in manifest order."""
        try:
            authenticate(context, self._enrollment)
            request = parse_request(raw, models_pb2.ModelRequest, self._limits.request_limit("DownloadModel"))
            model = self._model(request)
        except Exception as exc:  # mapped to a status at the edge
            await _abort(context, exc)
        offset = 0
        for name, array in sorted(model.arrays.items()):
            size = int(array.nbytes)
            for start in range(0, size, _MODEL_CHUNK):
                end = min(size, start + _MODEL_CHUNK)
                yield models_pb2.ModelChunk(
                    name=name, offset=start, data=model.blob[offset + start : offset + end]
                )
            offset += size


class EnrollmentRpc:
    """Exchanges one-time tokens and CSRs for device certificates (no client certificate needed).

    The request arrives as bytes and is parsed only after the connection was checked (TLS 1.3) and its size
    against :attr:`EdgeLimits.ENROLL_REQUEST_BYTES`.

    Replays of the same request id with the same token and CSR return the stored answer, so a device whose
    connection dropped after the token was spent still receives its certificate.

    Args:
        storage: the deployment's storage (idempotency records).
        enrollment: token checks, certificate issuance and device registration.
        federation_port: the mutual-TLS port devices use after enrolling.
    """

    def __init__(
        self, *, storage: Storage, enrollment: EnrollmentService, federation_port: int, limits: EdgeLimits
    ) -> None:
        self._storage = storage
        self._enrollment = enrollment
        self._port = federation_port
        self._limits = limits

    async def Enroll(self, raw: bytes, context: Context) -> enrollment_pb2.EnrollResponse:
        """Verify the token and CSR, issue and register the device certificate."""

        async def work() -> enrollment_pb2.EnrollResponse:
            auth = context.auth_context()
            if auth.get("ssl_tls_version") != [b"TLSv1.3"]:
                raise RpcRejection(grpc.StatusCode.UNAUTHENTICATED, "TLS 1.3 required")
            request = parse_request(raw, enrollment_pb2.EnrollRequest, self._limits.request_limit("Enroll"))
            _check_request_id(request.request_id)
            if (
                not request.token
                or len(request.token) > _MAX_TOKEN
                or not 0 < len(request.csr_pem) <= _MAX_CSR
            ):
                raise ValidationError("bad enrollment request")
            digest = _digest(hashlib.sha256(request.token.encode()).digest(), request.csr_pem)
            stored = self._storage.get_response(scope="enroll", request_id=request.request_id)
            if stored is not None:
                if stored.request_digest != digest:
                    raise ConflictError("request id reused")
                return enrollment_pb2.EnrollResponse.FromString(stored.response)
            result = self._enrollment.enroll(token=request.token, csr_pem=request.csr_pem)
            reply = enrollment_pb2.EnrollResponse(
                device_id=result.device.device_id,
                certificate_pem=result.certificate_pem,
                ca_certificate_pem=result.ca_certificate_pem,
                federation_port=self._port,
            )
            record = self._storage.record_response(
                scope="enroll",
                request_id=request.request_id,
                request_digest=digest,
                response=reply.SerializeToString(),
                now=_now(),
            )
            _log.info("device enrolled")
            return enrollment_pb2.EnrollResponse.FromString(record.response)

        return await _guard(context, work)


def register(
    server: grpc.aio.Server, *, federation: FederationRpc, models: ModelsRpc, enrollment: EnrollmentRpc
) -> None:
    """Add the three ``fedfer.v1`` services to ``server`` with requests delivered as bytes, so each servicer
    authenticates the caller before it parses (or even size-checks) the body."""
    unary = grpc.unary_unary_rpc_method_handler
    handlers = {
        "fedfer.v1.Federation": {
            "GetRound": unary(federation.GetRound, response_serializer=_serialize),
            "JoinRound": unary(federation.JoinRound, response_serializer=_serialize),
            "AdvertiseKeys": unary(federation.AdvertiseKeys, response_serializer=_serialize),
            "ShareKeys": unary(federation.ShareKeys, response_serializer=_serialize),
            "UploadMaskedInput": grpc.stream_unary_rpc_method_handler(
                federation.UploadMaskedInput, response_serializer=_serialize
            ),
            "ConsistencyCheck": unary(federation.ConsistencyCheck, response_serializer=_serialize),
            "Unmask": unary(federation.Unmask, response_serializer=_serialize),
            "GetStageResult": unary(federation.GetStageResult, response_serializer=_serialize),
        },
        "fedfer.v1.Models": {
            "GetManifest": unary(models.GetManifest, response_serializer=_serialize),
            "DownloadModel": grpc.unary_stream_rpc_method_handler(
                models.DownloadModel, response_serializer=_serialize
            ),
        },
        "fedfer.v1.Enrollment": {"Enroll": unary(enrollment.Enroll, response_serializer=_serialize)},
    }
    for service, methods in handlers.items():
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, methods),))


def _serialize(message: Message) -> bytes:
    return message.SerializeToString()
