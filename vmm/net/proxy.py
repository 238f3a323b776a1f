"""The user-space port forwarder, for hosts where nftables is not usable.

One asyncio listener per forward. TCP: each accepted connection is joined to a new connection to
the guest, both directions copied until either side closes. UDP: one session per client address
(its own socket to the guest, so replies find their way back), dropped after ``UDP_IDLE``
seconds without traffic. Sessions are bounded per forward (``MAX_SESSIONS``): past that a new
TCP client is closed and a new UDP client's datagrams are dropped, so a flood cannot exhaust the
daemon's file descriptors. The guest sees the daemon as the client (unlike nft DNAT).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from typing import Protocol

log = logging.getLogger(__name__)

MAX_SESSIONS = 256
UDP_IDLE = 60.0
CONNECT_TIMEOUT = 10.0
CHUNK = 256 * 1024


class Route(Protocol):
    @property
    def protocol(self) -> str: ...
    @property
    def address(self) -> str: ...
    @property
    def host_port(self) -> int: ...
    @property
    def guest_ip(self) -> str: ...
    @property
    def vm_port(self) -> int: ...


Key = tuple[str, str, int, str, int]


def _key(route: Route) -> Key:
    return (route.protocol, route.address, route.host_port, route.guest_ip, route.vm_port)


class UserspaceForwarder:
    name = "userspace"

    def __init__(self, max_sessions: int = MAX_SESSIONS, udp_idle: float = UDP_IDLE) -> None:
        self.max_sessions = max_sessions
        self.udp_idle = udp_idle
        self._listeners: dict[Key, _TcpListener | _UdpListener] = {}

    async def apply(self, forwards: Sequence[Route]) -> None:
        wanted = {_key(fw): fw for fw in forwards}
        for key in [k for k in self._listeners if k not in wanted]:
            await self._listeners.pop(key).close()
        for key, fw in wanted.items():
            if key in self._listeners:
                continue
            listener: _TcpListener | _UdpListener
            listener = (_TcpListener(fw, self.max_sessions) if fw.protocol == "tcp"
                        else _UdpListener(fw, self.max_sessions, self.udp_idle))  # fmt: skip
            try:
                await listener.open()
            except OSError as exc:
                log.warning("cannot listen for %s %s:%d: %s", fw.protocol, fw.address,
                            fw.host_port, exc)  # fmt: skip
                continue
            self._listeners[key] = listener

    async def close(self) -> None:
        await self.apply([])


class _TcpListener:
    def __init__(self, route: Route, max_sessions: int) -> None:
        self.route = route
        self.max_sessions = max_sessions
        self.server: asyncio.Server | None = None
        self.sessions: set[asyncio.Task[None]] = set()

    async def open(self) -> None:
        self.server = await asyncio.start_server(
            self._accept, self.route.address, self.route.host_port, reuse_address=True
        )

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if len(self.sessions) >= self.max_sessions or task is None:
            writer.close()
            return
        self.sessions.add(task)
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                up_reader, up_writer = await asyncio.open_connection(
                    self.route.guest_ip, self.route.vm_port
                )
        except (OSError, TimeoutError) as exc:
            log.info("forward to %s:%d: %s", self.route.guest_ip, self.route.vm_port, exc)
            writer.close()
            self.sessions.discard(task)
            return
        try:
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        except asyncio.CancelledError:
            pass  # the forward was withdrawn (``close``): end the session quietly
        finally:
            for w in (writer, up_writer):
                w.close()
            self.sessions.discard(task)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for task in list(self.sessions):
            task.cancel()
        for task in list(self.sessions):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 5)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except OSError:
        writer.close()


class _UdpSession(asyncio.DatagramProtocol):
    def __init__(self, listener: _UdpListener, client: tuple[str, int]) -> None:
        self.listener = listener
        self.client = client
        self.transport: asyncio.DatagramTransport | None = None
        self.last = time.monotonic()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str | object, int]) -> None:
        self.last = time.monotonic()
        if self.listener.transport is not None:
            self.listener.transport.sendto(data, self.client)


class _UdpListener(asyncio.DatagramProtocol):
    def __init__(self, route: Route, max_sessions: int, idle: float) -> None:
        self.route = route
        self.max_sessions = max_sessions
        self.idle = idle
        self.transport: asyncio.DatagramTransport | None = None
        self.sessions: dict[tuple[str, int], _UdpSession] = {}
        self.pending: set[tuple[str, int]] = set()
        self.sweeper: asyncio.Task[None] | None = None

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.create_datagram_endpoint(
            lambda: self, local_addr=(self.route.address, self.route.host_port)
        )
        self.sweeper = asyncio.create_task(self._sweep())

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str | object, int]) -> None:
        client = (str(addr[0]), int(addr[1]))
        session = self.sessions.get(client)
        if session is not None and session.transport is not None:
            session.last = time.monotonic()
            session.transport.sendto(data)
            return
        if len(self.sessions) + len(self.pending) >= self.max_sessions or client in self.pending:
            return  # over the bound, or its session is still being opened: dropped, as UDP may
        self.pending.add(client)
        task = asyncio.create_task(self._open_session(client, data))
        task.add_done_callback(lambda _t: self.pending.discard(client))

    async def _open_session(self, client: tuple[str, int], first: bytes) -> None:
        loop = asyncio.get_running_loop()
        try:
            transport, session = await loop.create_datagram_endpoint(
                lambda: _UdpSession(self, client),
                remote_addr=(self.route.guest_ip, self.route.vm_port),
            )
        except OSError as exc:
            log.info("UDP forward to %s:%d: %s", self.route.guest_ip, self.route.vm_port, exc)
            return
        self.sessions[client] = session
        transport.sendto(first)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(min(self.idle / 6, 10.0))
            now = time.monotonic()
            for client, session in list(self.sessions.items()):
                if now - session.last > self.idle and session.transport is not None:
                    session.transport.close()
                    del self.sessions[client]

    async def close(self) -> None:
        if self.sweeper is not None:
            self.sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.sweeper
        for session in self.sessions.values():
            if session.transport is not None:
                session.transport.close()
        self.sessions.clear()
        if self.transport is not None:
            self.transport.close()
