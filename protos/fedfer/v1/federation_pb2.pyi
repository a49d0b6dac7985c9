from fedfer.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetRoundRequest(_message.Message):
    __slots__ = ("known_round_id", "known_stage", "wait_ms")
    KNOWN_ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    KNOWN_STAGE_FIELD_NUMBER: _ClassVar[int]
    WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    known_round_id: int
    known_stage: _common_pb2.Stage
    wait_ms: int
    def __init__(self, known_round_id: _Optional[int] = ..., known_stage: _Optional[_Union[_common_pb2.Stage, str]] = ..., wait_ms: _Optional[int] = ...) -> None: ...

class JoinRoundRequest(_message.Message):
    __slots__ = ("request_id", "round_id")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    round_id: int
    def __init__(self, request_id: _Optional[str] = ..., round_id: _Optional[int] = ...) -> None: ...

class RoundStatus(_message.Message):
    __slots__ = ("round_id", "stage", "model_version", "dim", "stage_deadline_unix_ms", "participant", "completed", "parameters", "latest_model_version", "detail", "client_index")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    STAGE_DEADLINE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANT_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    LATEST_MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    CLIENT_INDEX_FIELD_NUMBER: _ClassVar[int]
    round_id: int
    stage: _common_pb2.Stage
    model_version: str
    dim: int
    stage_deadline_unix_ms: int
    participant: bool
    completed: _containers.RepeatedScalarFieldContainer[_common_pb2.Stage]
    parameters: bytes
    latest_model_version: str
    detail: str
    client_index: int
    def __init__(self, round_id: _Optional[int] = ..., stage: _Optional[_Union[_common_pb2.Stage, str]] = ..., model_version: _Optional[str] = ..., dim: _Optional[int] = ..., stage_deadline_unix_ms: _Optional[int] = ..., participant: _Optional[bool] = ..., completed: _Optional[_Iterable[_Union[_common_pb2.Stage, str]]] = ..., parameters: _Optional[bytes] = ..., latest_model_version: _Optional[str] = ..., detail: _Optional[str] = ..., client_index: _Optional[int] = ...) -> None: ...

class StageMessage(_message.Message):
    __slots__ = ("request_id", "round_id", "payload")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    round_id: int
    payload: bytes
    def __init__(self, request_id: _Optional[str] = ..., round_id: _Optional[int] = ..., payload: _Optional[bytes] = ...) -> None: ...

class MaskedInputChunk(_message.Message):
    __slots__ = ("request_id", "round_id", "index", "count", "total_bytes", "data")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    round_id: int
    index: int
    count: int
    total_bytes: int
    data: bytes
    def __init__(self, request_id: _Optional[str] = ..., round_id: _Optional[int] = ..., index: _Optional[int] = ..., count: _Optional[int] = ..., total_bytes: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class StageResultRequest(_message.Message):
    __slots__ = ("round_id", "stage")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    round_id: int
    stage: _common_pb2.Stage
    def __init__(self, round_id: _Optional[int] = ..., stage: _Optional[_Union[_common_pb2.Stage, str]] = ...) -> None: ...

class StageResult(_message.Message):
    __slots__ = ("round_id", "stage", "payload", "peer_certificates")
    class PeerCertificatesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: bytes
        def __init__(self, key: _Optional[int] = ..., value: _Optional[bytes] = ...) -> None: ...
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    PEER_CERTIFICATES_FIELD_NUMBER: _ClassVar[int]
    round_id: int
    stage: _common_pb2.Stage
    payload: bytes
    peer_certificates: _containers.ScalarMap[int, bytes]
    def __init__(self, round_id: _Optional[int] = ..., stage: _Optional[_Union[_common_pb2.Stage, str]] = ..., payload: _Optional[bytes] = ..., peer_certificates: _Optional[_Mapping[int, bytes]] = ...) -> None: ...
