r"""Request/response frames for a byte stream that may lose or repeat bytes: the serial channel.

Over vsock every call has its own connection and HTTP frames it. A virtio-serial port is one
long-lived stream instead: the host can disconnect and reconnect mid-message, and bytes written
while nobody listens may or may not arrive later. So each message travels in a frame that a
reader can find again after garbage, check, and match to its call:

    magic  b"\x7fVMM"             4 bytes
    kind   1 = request, 2 = response   1 byte
    id     request id               8 bytes, big-endian (a response echoes its request's id)
    length payload length           4 bytes, big-endian, at most MAX_PAYLOAD
    payload                         ``length`` bytes
    crc    CRC-32 of kind..payload  4 bytes, big-endian

A reader that meets a bad frame (wrong CRC, absurd length) skips one byte and looks for the next
magic; a response whose id nobody waits for is dropped by the caller. That is what keeps a
reconnect from desynchronising the stream.

The payload is a tiny HTTP-like envelope, so the same pRPC handling serves HTTP (vsock) and
frames (serial): a 2-byte big-endian header length, a JSON header, then the body bytes.
Request header ``{"path": "/api/SysInfo?json", "content_type": "application/json"}``;
response header ``{"status": 200, "content_type": "application/json"}``.

Standard library only: this module runs inside the guest as well as in the daemon.
"""

from __future__ import annotations

import json
import struct
import zlib

MAGIC = b"\x7fVMM"
REQUEST = 1
RESPONSE = 2
MAX_PAYLOAD = 4 * 1024 * 1024
_HEAD = struct.Struct(">BQI")  # kind, id, length
_CRC = struct.Struct(">I")
HEADER_SIZE = len(MAGIC) + _HEAD.size
OVERHEAD = HEADER_SIZE + _CRC.size


class FrameError(ValueError):
    """A message cannot be framed (too large) or an envelope is malformed."""


class Frame:
    """One decoded frame. A plain class: importing dataclasses costs ~0.1 s of guest boot."""

    __slots__ = ("id", "kind", "payload")

    def __init__(self, kind: int, id: int, payload: bytes) -> None:
        self.kind = kind
        self.id = id
        self.payload = payload


def encode_frame(kind: int, request_id: int, payload: bytes) -> bytes:
    if kind not in (REQUEST, RESPONSE):
        raise FrameError(f"bad frame kind {kind}")
    if len(payload) > MAX_PAYLOAD:
        raise FrameError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    head = _HEAD.pack(kind, request_id, len(payload))
    return MAGIC + head + payload + _CRC.pack(zlib.crc32(head + payload))


class FrameDecoder:
    """Feed bytes in, get whole valid frames out; garbage and corrupt frames are skipped."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self.skipped = 0  # bytes thrown away while resynchronising (for logs and tests)

    def feed(self, data: bytes) -> list[Frame]:
        self._buffer += data
        frames: list[Frame] = []
        while True:
            start = self._buffer.find(MAGIC)
            if start < 0:
                # Keep a possible partial magic at the end; drop the rest.
                keep = len(MAGIC) - 1
                dropped = max(len(self._buffer) - keep, 0)
                self.skipped += dropped
                del self._buffer[:dropped]
                return frames
            if start:
                self.skipped += start
                del self._buffer[:start]
            if len(self._buffer) < HEADER_SIZE:
                return frames
            kind, request_id, length = _HEAD.unpack_from(self._buffer, len(MAGIC))
            if kind not in (REQUEST, RESPONSE) or length > MAX_PAYLOAD:
                self._skip_one()
                continue
            total = HEADER_SIZE + length + _CRC.size
            if len(self._buffer) < total:
                return frames
            body = bytes(self._buffer[len(MAGIC) : HEADER_SIZE + length])
            (crc,) = _CRC.unpack_from(self._buffer, HEADER_SIZE + length)
            if zlib.crc32(body) != crc:
                self._skip_one()
                continue
            frames.append(Frame(kind=kind, id=request_id, payload=body[_HEAD.size :]))
            del self._buffer[:total]

    def _skip_one(self) -> None:
        self.skipped += 1
        del self._buffer[:1]


def encode_request(path: str, content_type: str, body: bytes) -> bytes:
    return _envelope({"path": path, "content_type": content_type}, body)


def encode_response(status: int, content_type: str, body: bytes) -> bytes:
    return _envelope({"status": status, "content_type": content_type}, body)


def decode_request(payload: bytes) -> tuple[str, str, bytes]:
    header, body = _open(payload)
    path, content_type = header.get("path"), header.get("content_type", "")
    if not isinstance(path, str) or not isinstance(content_type, str):
        raise FrameError("request envelope needs a string path and content_type")
    return path, content_type, body


def decode_response(payload: bytes) -> tuple[int, str, bytes]:
    header, body = _open(payload)
    status, content_type = header.get("status"), header.get("content_type", "")
    if not isinstance(status, int) or not isinstance(content_type, str):
        raise FrameError("response envelope needs an integer status and a content_type")
    return status, content_type, body


def _envelope(header: dict[str, object], body: bytes) -> bytes:
    encoded = json.dumps(header, separators=(",", ":")).encode()
    if len(encoded) > 0xFFFF:
        raise FrameError("envelope header too large")
    return struct.pack(">H", len(encoded)) + encoded + body


def _open(payload: bytes) -> tuple[dict[str, object], bytes]:
    if len(payload) < 2:
        raise FrameError("envelope too short")
    (size,) = struct.unpack_from(">H", payload)
    if len(payload) < 2 + size:
        raise FrameError("envelope header truncated")
    try:
        header = json.loads(payload[2 : 2 + size])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FrameError(f"envelope header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise FrameError("envelope header is not an object")
    return header, payload[2 + size :]
