"""One system call, and one TCP segment, per HTTP response instead of one per part.

uvicorn writes a response's head and its body to the transport separately, and asyncio sends
each write at once: a small answer leaves as two segments. The client's kernel wakes it for the
head, and again if the body was not there yet; the first send also wakes the client while the
daemon still has the body to send, and on a busy host the woken client often takes the CPU the
daemon needed for that. ``BatchedWrites`` stands between uvicorn and the socket's transport: the
writes made in one step of the event loop leave together, when the response is complete (the
protocol calls ``flush``), at the end of the step (a streamed response: each chunk still leaves
at once), or as soon as they reach ``FLUSH_AT`` bytes (so the transport's own flow control, which
pauses a writer past its high-water mark, still sees every large body).
"""

from __future__ import annotations

import asyncio
from typing import Any

# Bytes held back at most; past this a write goes out at once.
FLUSH_AT = 64 * 1024


class BatchedWrites(asyncio.Transport):
    """A transport that holds the writes of one loop step and sends them as one."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self.transport = transport
        self._loop = loop
        self._held: list[bytes] = []
        self._size = 0
        self.flushes = 0  # writes handed to the transport (tests count them)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        if not self._held:
            self._loop.call_soon(self.flush)
        self._held.append(bytes(data))
        self._size += len(data)
        if self._size >= FLUSH_AT:
            self.flush()

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.write(data)

    def flush(self) -> None:
        """Send what is held (a no-op when nothing is, or when the connection is going)."""
        if not self._held:
            return
        data = self._held[0] if len(self._held) == 1 else b"".join(self._held)
        self._held.clear()
        self._size = 0
        if not self.transport.is_closing():
            self.flushes += 1
            self.transport.write(data)

    def close(self) -> None:
        self.flush()
        self.transport.close()

    def abort(self) -> None:
        self._held.clear()
        self._size = 0
        self.transport.abort()

    def is_closing(self) -> bool:
        return self.transport.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.transport.get_extra_info(name, default)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.flush()
        self.transport.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self.transport.get_protocol()

    def pause_reading(self) -> None:
        self.transport.pause_reading()

    def resume_reading(self) -> None:
        self.transport.resume_reading()

    def is_reading(self) -> bool:
        return self.transport.is_reading()

    def get_write_buffer_size(self) -> int:
        return self._size + self.transport.get_write_buffer_size()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.transport.set_write_buffer_limits(high, low)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self.transport.get_write_buffer_limits()

    def can_write_eof(self) -> bool:
        return self.transport.can_write_eof()

    def write_eof(self) -> None:
        self.flush()
        self.transport.write_eof()
