"""The user-space forwarder over real loopback sockets: TCP, UDP, bounds, withdrawal."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from vmm.net.forwards import Forward
from vmm.net.proxy import UserspaceForwarder


def free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@asynccontextmanager
async def echo_servers() -> AsyncIterator[int]:
    """A TCP and a UDP echo server on one port number (the stand-in guest)."""
    port = free_port(socket.SOCK_STREAM)

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    class UdpEcho(asyncio.DatagramProtocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport: asyncio.DatagramTransport = transport  # type: ignore[assignment]

        def datagram_received(self, data: bytes, addr: tuple[str | object, int]) -> None:
            self.transport.sendto(b"echo:" + data, addr)

    server = await asyncio.start_server(echo, "127.0.0.1", port)
    udp, _ = await asyncio.get_running_loop().create_datagram_endpoint(
        UdpEcho, local_addr=("127.0.0.1", port))
    try:
        yield port
    finally:
        udp.close()
        server.close()
        await server.wait_closed()


def forward(protocol: str, host_port: int, guest_port: int) -> Forward:
    return Forward(protocol, "127.0.0.1", host_port, "127.0.0.1", guest_port, "br0", "vm")


async def tcp_roundtrip(port: int, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(payload)
    writer.write_eof()
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return data


async def udp_roundtrip(port: int, payload: bytes) -> bytes:
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        await loop.sock_connect(sock, ("127.0.0.1", port))
        await loop.sock_sendall(sock, payload)
        return await asyncio.wait_for(loop.sock_recv(sock, 65536), 10)


def test_tcp_and_udp_reach_the_guest_and_stop_when_withdrawn() -> None:
    """Both protocols are carried both ways; a withdrawn forward's listener is closed."""
    asyncio.run(carried_and_withdrawn())


async def carried_and_withdrawn() -> None:
    async with echo_servers() as guest:
        tcp, udp = free_port(socket.SOCK_STREAM), free_port(socket.SOCK_DGRAM)
        proxy = UserspaceForwarder()
        await proxy.apply([forward("tcp", tcp, guest), forward("udp", udp, guest)])
        try:
            big = bytes(range(256)) * 4096
            assert await tcp_roundtrip(tcp, big) == big
            assert await udp_roundtrip(udp, b"hi") == b"echo:hi"
            await proxy.apply([forward("udp", udp, guest)])
            with pytest.raises(OSError):
                await tcp_roundtrip(tcp, b"x")
        finally:
            await proxy.close()


def test_tcp_sessions_are_bounded() -> None:
    """Past max_sessions open connections a new client is closed without reaching the guest."""
    asyncio.run(bounded())


async def bounded() -> None:
    async with echo_servers() as guest:
        tcp = free_port(socket.SOCK_STREAM)
        proxy = UserspaceForwarder(max_sessions=2)
        await proxy.apply([forward("tcp", tcp, guest)])
        held = []
        try:
            for _ in range(2):
                reader, writer = await asyncio.open_connection("127.0.0.1", tcp)
                writer.write(b"a")
                assert await asyncio.wait_for(reader.readexactly(1), 10) == b"a"
                held.append(writer)
            reader, writer = await asyncio.open_connection("127.0.0.1", tcp)
            assert await asyncio.wait_for(reader.read(), 10) == b""  # closed, not forwarded
            writer.close()
        finally:
            for w in held:
                w.close()
            await proxy.close()
