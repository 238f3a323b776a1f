from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class AppId(_message.Message):
    __slots__ = ("app_id",)
    APP_ID_FIELD_NUMBER: _ClassVar[int]
    app_id: bytes
    def __init__(self, app_id: _Optional[bytes] = ...) -> None: ...

class PublicKeyResponse(_message.Message):
    __slots__ = ("public_key", "signature", "timestamp", "signature_v1")
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_V1_FIELD_NUMBER: _ClassVar[int]
    public_key: bytes
    signature: bytes
    timestamp: int
    signature_v1: bytes
    def __init__(self, public_key: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., timestamp: _Optional[int] = ..., signature_v1: _Optional[bytes] = ...) -> None: ...
