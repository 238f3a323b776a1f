from google.protobuf import empty_pb2 as _empty_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class HostInfo(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class Notification(_message.Message):
    __slots__ = ("event", "payload")
    EVENT_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    event: str
    payload: str
    def __init__(self, event: _Optional[str] = ..., payload: _Optional[str] = ...) -> None: ...

class GetSealingKeyRequest(_message.Message):
    __slots__ = ("quote",)
    QUOTE_FIELD_NUMBER: _ClassVar[int]
    quote: bytes
    def __init__(self, quote: _Optional[bytes] = ...) -> None: ...

class GetSealingKeyResponse(_message.Message):
    __slots__ = ("encrypted_key", "provider_quote")
    ENCRYPTED_KEY_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_QUOTE_FIELD_NUMBER: _ClassVar[int]
    encrypted_key: bytes
    provider_quote: bytes
    def __init__(self, encrypted_key: _Optional[bytes] = ..., provider_quote: _Optional[bytes] = ...) -> None: ...
