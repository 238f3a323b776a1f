"""Guest channel transports over real sockets: multiplexing, resync, reconnects, timeouts."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from guest_agent.framing import (
    REQUEST,
    RESPONSE,
    FrameDecoder,
    decode_request,
    encode_frame,
    encode_response,
)
from guest_proxy.transport import (
    AgentError,
    ChannelError,
    GuestAgentClient,
    SerialTransport,
    VsockHttpTransport,
    vsock_factory,
)
from tests.support import short_dirs

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture
def short_dir() -> Iterator[Path]:
    with short_dirs.short_dir("gc") as path:
        yield path


async def frame_peer(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, reverse: bool = False,
    garbage: bytes = b"",
) -> None:
    """A serial-port peer that answers each request with its own path (optionally batched)."""
    decoder = FrameDecoder()
    batch: list[bytes] = []
    try:
        while data := await reader.read(65536):
            for frame in decoder.feed(data):
                assert frame.kind == REQUEST
                path, _, body = decode_request(frame.payload)
                answer = json.dumps({"path": path, "body": body.decode()}).encode()
                batch.append(
                    encode_frame(RESPONSE, frame.id, encode_response(200, "application/json", answer))
                )
            if reverse and len(batch) < 20:
                continue
            for item in reversed(batch) if reverse else batch:
                writer.write(garbage + item)
            batch.clear()
            await writer.drain()
    finally:
        writer.close()


def run(coro: Awaitable[None]) -> None:
    async def with_settling() -> None:
        await asyncio.wait_for(coro, 60)
        # Let the peers see the client's hang-up and close their ends before the loop goes.
        for _ in range(5):
            await asyncio.sleep(0.01)

    asyncio.run(with_settling())


def test_concurrent_calls_are_multiplexed(short_dir: Path) -> None:
    """Twenty concurrent calls answered in reverse order each get their own answer."""
    async def scenario() -> None:
        server = await asyncio.start_unix_server(
            lambda r, w: frame_peer(r, w, reverse=True), str(short_dir / "agent.sock")
        )
        client = GuestAgentClient(SerialTransport(short_dir / "agent.sock"))
        try:
            answers = await asyncio.gather(*(client.call(f"M{i}", {"i": i}) for i in range(20)))
            assert [a["path"] for a in answers] == [f"/api/M{i}?json" for i in range(20)]
            assert [json.loads(a["body"])["i"] for a in answers] == list(range(20))
        finally:
            await client.close()
            server.close()
    run(scenario())


def test_a_transport_given_a_connected_socket_speaks_over_it(short_dir: Path) -> None:
    """With a socket factory, calls go over the socket it hands over, not to socket_path."""
    async def scenario() -> None:
        server = await asyncio.start_unix_server(frame_peer, str(short_dir / "agent.sock"))
        handed: list[socket.socket] = []

        async def connect() -> socket.socket:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, str(short_dir / "agent.sock"))
            handed.append(sock)
            return sock

        client = GuestAgentClient(SerialTransport(short_dir / "elsewhere.sock", connect=connect))
        try:
            assert (await client.call("Ping", {"n": 1}))["path"] == "/api/Ping?json"
            assert len(handed) == 1
        finally:
            await client.close()
            server.close()
    run(scenario())


def test_garbage_between_frames_is_skipped(short_dir: Path) -> None:
    """Stray bytes and fake magic between frames do not break the stream."""
    async def scenario() -> None:
        server = await asyncio.start_unix_server(
            lambda r, w: frame_peer(r, w, garbage=b"\x7fVMM\x09junk\x00\xff"),
            str(short_dir / "agent.sock"),
        )
        client = GuestAgentClient(SerialTransport(short_dir / "agent.sock"))
        try:
            for i in range(5):
                assert (await client.call("Ping", {"n": i}))["path"] == "/api/Ping?json"
        finally:
            await client.close()
            server.close()
    run(scenario())


def test_disconnect_fails_fast_and_reconnects_without_desync(short_dir: Path) -> None:
    """A peer vanishing mid-call fails that call at once; the next call reconnects and matches."""
    connections = 0
    stale: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        if connections == 1:
            # Swallow one request, remember it, and hang up without answering.
            data = await reader.read(65536)
            stale.extend(f.payload for f in FrameDecoder().feed(data))
            writer.close()
            return
        # On the new connection first send an answer for an id nobody waits for any more.
        writer.write(encode_frame(RESPONSE, 12345, encode_response(200, "application/json", b'"stale"')))
        await frame_peer(reader, writer)

    async def scenario() -> None:
        server = await asyncio.start_unix_server(handler, str(short_dir / "agent.sock"))
        client = GuestAgentClient(SerialTransport(short_dir / "agent.sock"), timeout=20)
        try:
            loop = asyncio.get_running_loop()
            started = loop.time()
            with pytest.raises(ChannelError, match="closed the channel"):
                await client.call("First")
            assert loop.time() - started < 15  # failed on the hang-up, not at the timeout
            answer = await client.call("Second")
            assert answer["path"] == "/api/Second?json"
            assert connections == 2 and len(stale) == 1
        finally:
            await client.close()
            server.close()
    run(scenario())


def test_silent_peer_times_out(short_dir: Path) -> None:
    """A peer that never answers gives a ChannelError after the call's timeout, not a hang."""
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.close()

    async def scenario() -> None:
        server = await asyncio.start_unix_server(silent, str(short_dir / "agent.sock"))
        client = GuestAgentClient(SerialTransport(short_dir / "agent.sock"))
        try:
            with pytest.raises(ChannelError, match=r"no answer within 0\.3s"):
                await client.call("SysInfo", timeout=0.3)
        finally:
            await client.close()
            server.close()
    run(scenario())


def test_missing_socket_is_a_channel_error(short_dir: Path) -> None:
    """No QEMU socket (VM not started) is a clear ChannelError."""
    async def scenario() -> None:
        client = GuestAgentClient(SerialTransport(short_dir / "nothing.sock"))
        with pytest.raises(ChannelError):
            await client.call("Info", timeout=1)
        await client.close()
    run(scenario())


async def http_agent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A tiny HTTP peer in the agent's shape: /api/Boom fails, anything else echoes the path."""
    request_line = (await reader.readline()).decode()
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    await reader.readexactly(length)
    path = request_line.split()[1]
    status, body = (400, b'{"error": "boom"}') if "Boom" in path else (200, json.dumps(path).encode())
    writer.write(f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    await writer.drain()
    writer.close()


def test_vsock_http_transport_with_a_swapped_socket_factory(short_dir: Path) -> None:
    """The vsock code path runs unchanged when the factory hands it a Unix socket."""
    async def scenario() -> None:
        server = await asyncio.start_unix_server(http_agent, str(short_dir / "http.sock"))

        async def connect() -> socket.socket:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, str(short_dir / "http.sock"))
            return sock

        client = GuestAgentClient(VsockHttpTransport(connect))
        try:
            assert await client.call("SysInfo") == "/api/SysInfo?json"
            with pytest.raises(AgentError, match="refused Boom: boom"):
                await client.call("Boom")
        finally:
            await client.close()
            server.close()
    run(scenario())


def test_real_vsock_is_unavailable_here() -> None:
    """On this machine AF_VSOCK cannot connect, and the transport says so instead of hanging."""
    async def scenario() -> None:
        client = GuestAgentClient(VsockHttpTransport(vsock_factory(1000)))
        with pytest.raises(ChannelError):
            await client.call("Info", timeout=5)
    run(scenario())


def test_a_call_on_an_open_channel_starts_no_task(short_dir: Path) -> None:
    """Once connected, a serial call runs in its caller's task: no task per step, no extra turns."""
    async def scenario() -> None:
        server = await asyncio.start_unix_server(frame_peer, str(short_dir / "agent.sock"))
        client = GuestAgentClient(SerialTransport(short_dir / "agent.sock"))
        loop = asyncio.get_running_loop()
        started: list[str] = []

        def counting_factory(loop: asyncio.AbstractEventLoop, coro: Any) -> asyncio.Task[Any]:
            started.append(coro.__qualname__)
            return asyncio.Task(coro, loop=loop)

        try:
            await client.call("Ping")  # connects: the reader task and the peer's handler start
            loop.set_task_factory(counting_factory)
            for _ in range(3):
                assert (await client.call("Ping"))["path"] == "/api/Ping?json"
            assert started == []
        finally:
            loop.set_task_factory(None)
            await client.close()
            server.close()
    run(scenario())


class AnsweringPeer(asyncio.Protocol):
    """A serial-port peer that answers each request within the turn its bytes arrive in."""

    def __init__(self) -> None:
        self.decoder = FrameDecoder()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        for frame in self.decoder.feed(data):
            answer = encode_response(200, "application/json", b'{"pong": true}')
            self.transport.write(encode_frame(RESPONSE, frame.id, answer))


def test_an_answer_reaches_its_caller_in_the_next_turn(short_dir: Path) -> None:
    """A call takes three turns of the event loop: its own, the peer's, and its answer's."""
    async def scenario() -> list[int]:
        loop = asyncio.get_running_loop()
        server = await loop.create_unix_server(AnsweringPeer, str(short_dir / "agent.sock"))
        client = GuestAgentClient(SerialTransport(short_dir / "agent.sock"))
        turns = 0
        ticking = True

        def tick() -> None:
            nonlocal turns
            turns += 1
            if ticking:
                loop.call_soon(tick)

        try:
            await client.call("Ping")  # connects
            counts = []
            for _ in range(3):
                loop.call_soon(tick)
                turns = 0
                assert await client.call("Ping") == {"pong": True}
                counts.append(turns)
                ticking = False
                await asyncio.sleep(0)  # the ticker stops
                ticking = True
            return counts
        finally:
            await client.close()
            server.close()

    counts: list[int] = []

    async def keep() -> None:
        counts.extend(await scenario())

    run(keep())
    # With asyncio.wait_for per step and a reader task a call took eight: a task each for the
    # connect check and the drain, and the reader task woke before it resolved the call.
    assert counts == [3, 3, 3]
