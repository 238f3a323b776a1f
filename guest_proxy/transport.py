"""Talking to a VM: one request/response exchange over two transports.

An exchange is ``(path, content_type, body) -> (status, content_type, body)``: a pRPC call
without the HTTP around it. Two transports carry it:

* ``VsockHttpTransport`` — production: one HTTP/1.1 connection per call to the guest agent at
  ``(cid, 8000)``. The socket comes from a factory, so tests swap AF_VSOCK for a TCP or Unix
  socket and run the very same code.
* ``SerialTransport`` — where /dev/vhost-vsock is missing: one long-lived connection to the
  Unix socket QEMU exposes for the VM's virtio-serial port, carrying frames
  (``guest_agent.framing``). Calls are multiplexed by id, so concurrent callers are safe;
  answers for ids nobody waits for are dropped, so a reconnect never desynchronises the stream.

``GuestAgentClient`` layers pRPC JSON on top. Every call has a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import random
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

from guest_agent.framing import (
    REQUEST,
    RESPONSE,
    FrameDecoder,
    FrameError,
    decode_response,
    encode_frame,
    encode_request,
)
from vmm.core.exceptions import Unavailable

log = logging.getLogger(__name__)

AGENT_VSOCK_PORT = 8000
DEFAULT_TIMEOUT = 10.0
MAX_RESPONSE = 8 * 1024 * 1024

Exchange = tuple[int, str, bytes]
SocketFactory = Callable[[], Awaitable[socket.socket]]


class Transport(Protocol):
    async def exchange(self, path: str, content_type: str, body: bytes, timeout: float) -> Exchange: ...

    async def close(self) -> None: ...


class ChannelError(Unavailable):
    """The VM did not answer (not connected, no reply in time, or a broken reply)."""


def vsock_factory(cid: int, port: int = AGENT_VSOCK_PORT) -> SocketFactory:
    async def connect() -> socket.socket:
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, (cid, port))
        except BaseException:
            sock.close()
            raise
        return sock

    return connect


class VsockHttpTransport:
    """HTTP/1.1, one connection per call, over whatever stream socket the factory gives."""

    def __init__(self, connect: SocketFactory, host: str = "guest") -> None:
        self._connect = connect
        self._host = host

    async def exchange(self, path: str, content_type: str, body: bytes, timeout: float) -> Exchange:
        try:
            return await asyncio.wait_for(self._exchange(path, content_type, body), timeout)
        except TimeoutError:
            raise ChannelError(f"no answer within {timeout:g}s") from None
        except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
            raise ChannelError(f"{type(exc).__name__}: {exc}") from None

    async def _exchange(self, path: str, content_type: str, body: bytes) -> Exchange:
        sock = await self._connect()
        reader, writer = await asyncio.open_connection(sock=sock)
        try:
            head = (
                f"POST {path} HTTP/1.1\r\nHost: {self._host}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode() + body)
            await writer.drain()
            status_line = await reader.readline()
            parts = status_line.decode("latin-1").split(" ", 2)
            if len(parts) < 2 or not parts[0].startswith("HTTP/"):
                raise ValueError(f"not an HTTP response: {status_line[:80]!r}")
            status = int(parts[1])
            headers: dict[str, str] = {}
            while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                headers[name.strip().lower()] = value.strip()
            if "content-length" in headers:
                length = int(headers["content-length"])
                if length > MAX_RESPONSE:
                    raise ValueError(f"response of {length} bytes is too large")
                payload = await reader.readexactly(length)
            else:
                payload = await reader.read(MAX_RESPONSE)
            return status, headers.get("content-type", ""), payload
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def close(self) -> None:
        """Nothing is kept open between calls."""


class _FrameChannel(asyncio.Protocol):
    """One connection to a VM's serial port: answers are matched to their calls as bytes arrive.

    A protocol rather than a reader task: an answer resolves its call's future inside
    ``data_received``, so the caller runs in the next turn of the event loop, with no task to
    wake in between.
    """

    def __init__(self, pending: dict[int, asyncio.Future[bytes]], socket_path: Path) -> None:
        self._pending = pending
        self._socket_path = socket_path
        self._decoder = FrameDecoder()
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self._paused = False
        self._drained: list[asyncio.Future[None]] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        for frame in self._decoder.feed(data):
            future = self._pending.get(frame.id) if frame.kind == RESPONSE else None
            if future is not None and not future.done():
                future.set_result(frame.payload)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self._decoder.skipped:
            log.info("%s: skipped %d stray bytes", self._socket_path, self._decoder.skipped)
        # Calls in flight cannot be answered on this connection any more: fail them now rather
        # than at their timeout.
        for future in self._pending.values():
            if not future.done():
                future.set_exception(ConnectionError("the VM side closed the channel"))
        self.resume_writing()

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        for waiter in self._drained:
            if not waiter.done():
                waiter.set_result(None)
        self._drained.clear()

    def is_open(self) -> bool:
        return not self.lost and self.transport is not None and not self.transport.is_closing()

    def send(self, data: bytes) -> None:
        if self.transport is None or self.lost:
            raise ConnectionError("the VM side closed the channel")
        self.transport.write(data)

    async def drain(self) -> None:
        """Return once the kernel has room for more (at once, unless QEMU stopped reading)."""
        while self._paused:
            waiter = asyncio.get_running_loop().create_future()
            self._drained.append(waiter)
            await waiter
        if self.lost:
            raise ConnectionError("the VM side closed the channel")

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class SerialTransport:
    """Frames over the Unix socket QEMU serves for a virtio-serial port; calls multiplexed.

    ``connect``, when given, hands over an already connected Unix socket instead of connecting
    to ``socket_path`` (which still names the channel in messages): a bench shares the daemon's.
    """

    def __init__(self, socket_path: Path, connect: SocketFactory | None = None) -> None:
        self.socket_path = socket_path
        self._connect = connect
        self._channel: _FrameChannel | None = None
        self._pending: dict[int, asyncio.Future[bytes]] = {}
        # Random start: ids from before a daemon restart never match this run's calls.
        self._ids = itertools.count(random.getrandbits(48))
        self._connect_lock = asyncio.Lock()
        self._closed = False

    async def exchange(self, path: str, content_type: str, body: bytes, timeout: float) -> Exchange:
        request_id = next(self._ids)
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            # One deadline over the whole exchange. ``asyncio.wait_for`` per step would run each
            # coroutine (connect, drain) as a task of its own: two more turns of the event loop
            # and three timers per call, on a path whose every wake-up competes with the VM.
            async with asyncio.timeout(timeout):
                channel = await self._connected()
                channel.send(encode_frame(REQUEST, request_id, encode_request(path, content_type, body)))
                await channel.drain()
                payload = await future
            return decode_response(payload)
        except TimeoutError:
            raise ChannelError(f"no answer within {timeout:g}s on {self.socket_path.name}") from None
        except (OSError, FrameError, ConnectionError) as exc:
            raise ChannelError(f"{self.socket_path.name}: {exc}") from None
        finally:
            self._pending.pop(request_id, None)

    async def _connected(self) -> _FrameChannel:
        channel = self._channel
        if channel is not None and channel.is_open() and not self._closed:
            return channel  # the usual case: nothing to open, so no lock to take
        async with self._connect_lock:
            if self._closed:
                raise ConnectionError("channel closed")
            if self._channel is not None and self._channel.is_open():
                return self._channel
            loop = asyncio.get_running_loop()
            make = lambda: _FrameChannel(self._pending, self.socket_path)  # noqa: E731
            if self._connect is None:
                _, channel = await loop.create_unix_connection(make, str(self.socket_path))
            else:
                _, channel = await loop.create_unix_connection(make, sock=await self._connect())
            self._channel = channel
            return channel

    async def close(self) -> None:
        self._closed = True
        if self._channel is not None:
            self._channel.close()


class AgentError(Unavailable):
    """The guest agent answered with an error."""


class GuestAgentClient:
    """pRPC JSON calls to the guest agent's ``/api/<Method>``."""

    def __init__(self, transport: Transport, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.transport = transport
        self.timeout = timeout

    async def call(self, method: str, request: Any = None, timeout: float | None = None) -> Any:
        body = b"" if request is None else json.dumps(request).encode()
        status, _, payload = await self.transport.exchange(
            f"/api/{method}?json", "application/json", body, timeout or self.timeout
        )
        try:
            value = json.loads(payload) if payload.strip() else None
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise AgentError(f"guest agent sent a non-JSON answer to {method}") from None
        if status != 200:
            message = value.get("error") if isinstance(value, dict) else None
            raise AgentError(f"guest agent refused {method}: {message or f'HTTP {status}'}")
        return value

    async def close(self) -> None:
        await self.transport.close()
