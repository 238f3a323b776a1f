"""One connection served by the daemon's guarded HTTP protocol over a socket pair, in-process."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import uvicorn
from starlette.types import ASGIApp
from uvicorn.server import ServerState

from vmm.api.connection_guard import Deadlines, GuardedHttpProtocol, ListenerSlots, protocol_factory


@dataclass
class Served:
    """The server's protocol and listener slots, and the client's end of the connection."""

    protocol: GuardedHttpProtocol
    slots: ListenerSlots
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter


@asynccontextmanager
async def guarded_connection(app: ASGIApp, head: float = 30, body: float = 30
                             ) -> AsyncIterator[Served]:
    """``app`` behind the guarded protocol, one connection to it; both ends closed after."""
    config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="off", ws="none")
    config.load()
    slots = ListenerSlots("test", 10)
    factory = protocol_factory(config, ServerState(), {}, slots, Deadlines(head=head, body=body))
    ours, theirs = socket.socketpair()
    transport, protocol = await asyncio.get_running_loop().connect_accepted_socket(
        factory, sock=ours)
    assert isinstance(protocol, GuardedHttpProtocol)
    reader, writer = await asyncio.open_connection(sock=theirs)
    try:
        yield Served(protocol, slots, reader, writer)
    finally:
        writer.close()
        transport.close()
