"""A bare relay for bench_guest_proxy: the least any proxy process can do per /guest call.

It reads ``POST /guest/SysInfo`` from one keep-alive HTTP client, forwards the call to the agent
over the channel descriptor it inherits (a duplicate of the daemon's), and writes the agent's
answer back, with the same channel code as the daemon. No auth, routing, request ids, limits or
validation: what it adds over a direct call is the cost of a process in the middle (two more
wake-ups and hand-overs per call). The bench runs it beside the daemon as a reference: the least
work a proxy can do, which on a host where wake-ups dominate is not always the least latency.

    python bench/guest_relay.py CHANNEL_FD

Prints its TCP port once listening; exits when its standard input closes (the bench is gone).
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from guest_proxy.transport import GuestAgentClient, SerialTransport  # noqa: E402

AGENT_TIMEOUT = 10.0


class RelayProtocol(asyncio.Protocol):
    """One client connection: each complete request becomes one agent call."""

    def __init__(self, agent: GuestAgentClient) -> None:
        self.agent = agent
        self.buffer = b""
        self.transport: asyncio.Transport | None = None
        self.answering: set[asyncio.Task[None]] = set()  # referenced until done

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            head, _, rest = self.buffer.partition(b"\r\n\r\n")
            length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            if len(rest) < length:
                return
            self.buffer = rest[length:]
            task = asyncio.ensure_future(self.answer())
            self.answering.add(task)
            task.add_done_callback(self.answering.discard)

    async def answer(self) -> None:
        value = await self.agent.call("SysInfo", timeout=AGENT_TIMEOUT)
        body = json.dumps(value, separators=(",", ":")).encode()
        assert self.transport is not None
        self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                             b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


async def serve(channel_fd: int) -> None:
    channel = socket.socket(fileno=channel_fd)
    channel.setblocking(False)

    async def shared() -> socket.socket:
        return channel

    agent = GuestAgentClient(SerialTransport(Path("agent.sock"), connect=shared))
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: RelayProtocol(agent), "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    parent_gone = asyncio.Event()
    loop.add_reader(sys.stdin.fileno(), parent_gone.set)
    await parent_gone.wait()
    server.close()


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1])))
