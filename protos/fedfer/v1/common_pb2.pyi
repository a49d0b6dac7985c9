from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Stage(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STAGE_UNSPECIFIED: _ClassVar[Stage]
    STAGE_IDLE: _ClassVar[Stage]
    STAGE_ADVERTISE_KEYS: _ClassVar[Stage]
    STAGE_SHARE_KEYS: _ClassVar[Stage]
    STAGE_MASKED_INPUT: _ClassVar[Stage]
    STAGE_UNMASK: _ClassVar[Stage]
    STAGE_FINISHED: _ClassVar[Stage]
    STAGE_ABORTED: _ClassVar[Stage]
    STAGE_CHECK_IN: _ClassVar[Stage]
    STAGE_CONSISTENCY_CHECK: _ClassVar[Stage]
STAGE_UNSPECIFIED: Stage
STAGE_IDLE: Stage
STAGE_ADVERTISE_KEYS: Stage
STAGE_SHARE_KEYS: Stage
STAGE_MASKED_INPUT: Stage
STAGE_UNMASK: Stage
STAGE_FINISHED: Stage
STAGE_ABORTED: Stage
STAGE_CHECK_IN: Stage
STAGE_CONSISTENCY_CHECK: Stage

class StageAck(_message.Message):
    __slots__ = ("request_id", "round_id", "stage", "replayed")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    round_id: int
    stage: Stage
    replayed: bool
    def __init__(self, request_id: _Optional[str] = ..., round_id: _Optional[int] = ..., stage: _Optional[_Union[Stage, str]] = ..., replayed: _Optional[bool] = ...) -> None: ...
