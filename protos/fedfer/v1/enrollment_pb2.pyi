from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class EnrollRequest(_message.Message):
    __slots__ = ("request_id", "token", "csr_pem")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    CSR_PEM_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    token: str
    csr_pem: bytes
    def __init__(self, request_id: _Optional[str] = ..., token: _Optional[str] = ..., csr_pem: _Optional[bytes] = ...) -> None: ...

class EnrollResponse(_message.Message):
    __slots__ = ("device_id", "certificate_pem", "ca_certificate_pem", "federation_port")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_PEM_FIELD_NUMBER: _ClassVar[int]
    CA_CERTIFICATE_PEM_FIELD_NUMBER: _ClassVar[int]
    FEDERATION_PORT_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    certificate_pem: bytes
    ca_certificate_pem: bytes
    federation_port: int
    def __init__(self, device_id: _Optional[str] = ..., certificate_pem: _Optional[bytes] = ..., ca_certificate_pem: _Optional[bytes] = ..., federation_port: _Optional[int] = ...) -> None: ...
