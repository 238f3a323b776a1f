"""One write per HTTP response: the guarded protocol batches uvicorn's writes over real sockets."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from tests.support.guarded_http import guarded_connection
from vmm.api.write_batch import FLUSH_AT, BatchedWrites


async def small(request: Request) -> Response:
    return Response(b'{"ok":true}', media_type="application/json")


async def streamed(request: Request) -> StreamingResponse:
    async def chunks() -> AsyncIterator[bytes]:
        yield b"first\n"
        await asyncio.sleep(0.01)  # a follower waiting for the next log line
        yield b"second\n"

    return StreamingResponse(chunks(), media_type="text/plain")


APP = Starlette(routes=[Route("/small", small), Route("/streamed", streamed)])


async def serve_one(path: str) -> tuple[bytes, int]:
    """(the raw answer to one GET of ``path``, the writes the protocol handed to the socket)."""
    async with guarded_connection(APP) as served:
        served.writer.write(f"GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode())
        async with asyncio.timeout(30):
            answer = await served.reader.read()  # until the server closes
        return answer, served.protocol.batch.flushes


def test_a_small_response_leaves_in_one_write() -> None:
    """Head and body of a response go to the socket in one write, not one per part."""
    answer, writes = asyncio.run(serve_one("/small"))
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b'{"ok":true}')
    assert writes == 1


def test_a_streamed_response_still_sends_each_chunk_when_made() -> None:
    """A chunk made after an await leaves in its own write: a follower is not held back."""
    answer, writes = asyncio.run(serve_one("/streamed"))
    assert b"first\n" in answer and b"second\n" in answer
    assert writes >= 2


async def socket_pair_transport() -> tuple[asyncio.Transport, asyncio.StreamReader,
                                           asyncio.StreamWriter]:
    ours, theirs = socket.socketpair()
    loop = asyncio.get_running_loop()
    transport, _ = await loop.connect_accepted_socket(asyncio.Protocol, sock=ours)
    reader, writer = await asyncio.open_connection(sock=theirs)
    assert isinstance(transport, asyncio.Transport)
    return transport, reader, writer


def test_a_large_write_leaves_at_once_and_close_sends_what_is_held() -> None:
    """Past FLUSH_AT bytes a write is not held (flow control sees it); close flushes first."""
    async def scenario() -> None:
        transport, reader, peer = await socket_pair_transport()
        try:
            batch = BatchedWrites(transport, asyncio.get_running_loop())
            batch.write(b"x" * FLUSH_AT)
            assert batch.flushes == 1  # in the same step, not at its end
            batch.write(b"tail")
            assert batch.flushes == 1
            batch.close()
            async with asyncio.timeout(30):
                assert await reader.read() == b"x" * FLUSH_AT + b"tail"
        finally:
            peer.close()

    asyncio.run(scenario())
