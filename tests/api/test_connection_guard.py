"""The guarded HTTP protocol's deadlines and answers over real sockets, request by request."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tests.support.guarded_http import guarded_connection
from vmm.api.connection_guard import MAX_HEAD, GuardedHttpProtocol, ListenerSlots


async def echo(request: Request) -> Response:
    body = await request.body()
    if request.query_params.get("slow"):
        await asyncio.sleep(float(request.query_params["slow"]))
    return Response(request.url.path.encode() + b":" + body, media_type="text/plain")


APP = Starlette(routes=[Route("/{name}", echo, methods=["GET", "POST"])])


@asynccontextmanager
async def connection(
    head: float = 30, body: float = 30
) -> AsyncIterator[tuple[GuardedHttpProtocol, ListenerSlots, asyncio.StreamReader,
                         asyncio.StreamWriter]]:
    """One guarded server connection to APP and the client's end of it."""
    async with guarded_connection(APP, head=head, body=body) as served:
        yield served.protocol, served.slots, served.reader, served.writer


async def read_response(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """(head, body) of one Content-Length response."""
    async with asyncio.timeout(30):
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        return head, await reader.readexactly(length)


def test_pipelined_requests_are_answered_in_order_and_the_connection_idles() -> None:
    """Two requests in one write: two answers in order; then the connection waits for a head."""
    async def scenario() -> None:
        async with connection() as (protocol, slots, reader, writer):
            writer.write(b"POST /one HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\n\r\nA"
                         b"GET /two HTTP/1.1\r\nHost: t\r\n\r\n")
            assert (await read_response(reader))[1] == b"/one:A"
            assert (await read_response(reader))[1] == b"/two:"
            await asyncio.sleep(0)  # the second response's completion has run
            assert protocol in slots.waiting

    asyncio.run(scenario())


def test_a_pipelined_head_waits_for_the_answer_before_it_without_a_deadline() -> None:
    """Part of a head queued behind a slow request is not cut off by the head deadline meanwhile."""
    async def scenario() -> None:
        async with connection(head=0.3) as (_, _slots, reader, writer):
            writer.write(b"GET /slow?slow=1 HTTP/1.1\r\nHost: t\r\n\r\nGET /next HTTP/1.1\r\n")
            await asyncio.sleep(0.6)  # past the head deadline, while /slow is still handled
            writer.write(b"Host: t\r\n\r\n")
            assert (await read_response(reader))[1] == b"/slow:"
            assert (await read_response(reader))[1] == b"/next:"

    asyncio.run(scenario())


def test_a_body_that_stops_coming_closes_the_connection_at_the_body_deadline() -> None:
    """Head in, body short of its Content-Length: the connection closes once the deadline passes."""
    async def scenario() -> None:
        async with connection(body=0.3) as (_, slots, reader, writer):
            writer.write(b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nabc")
            async with asyncio.timeout(30):
                assert await reader.read() == b""  # closed, with no answer
            assert not slots.open

    asyncio.run(scenario())


def test_a_malformed_request_gets_a_400_in_the_apis_form_and_the_connection_closes() -> None:
    """Bytes that are not HTTP: a JSON 400 with the common headers, then the connection closes."""
    async def scenario() -> None:
        async with connection() as (_, _slots, reader, writer):
            writer.write(b"NOT HTTP AT ALL\r\n\r\n")
            async with asyncio.timeout(30):
                answer = await reader.read()
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400")
        assert b"x-content-type-options: nosniff" in head
        assert b"connection: close" in head
        assert b'"code": "INVALID_ARGUMENT"' in body

    asyncio.run(scenario())


def test_a_head_sent_in_pieces_is_served_once_complete() -> None:
    """A head that arrives over several writes is parsed whole and answered (within the deadline)."""
    async def scenario() -> None:
        async with connection(head=5) as (_, _slots, reader, writer):
            for piece in (b"GET /pie", b"ces HTTP/1.1\r\nHo", b"st: t\r\n", b"\r\n"):
                writer.write(piece)
                await writer.drain()
                await asyncio.sleep(0.05)
            assert (await read_response(reader))[1] == b"/pieces:"

    asyncio.run(scenario())


def test_a_head_that_never_ends_gets_a_431_before_it_grows_the_daemon() -> None:
    """An endless header: a 431 once the head passes MAX_HEAD, then the connection closes."""
    async def scenario() -> None:
        async with connection() as (_, slots, reader, writer):
            writer.write(b"GET /x HTTP/1.1\r\nHost: t\r\nX-Endless: ")
            answer_read = asyncio.ensure_future(reader.read())  # until the server closes
            sent = 0
            while not answer_read.done() and sent < 4 * 1024 * 1024:
                writer.write(b"a" * 16384)
                sent += 16384
                with contextlib.suppress(ConnectionError):
                    await writer.drain()
                await asyncio.sleep(0.001)  # the server reads each piece on its own
            async with asyncio.timeout(30):
                answer = await answer_read
            assert answer.startswith(b"HTTP/1.1 431")
            assert b"request head larger than" in answer
            # Refused within one read of the bound, not after megabytes.
            assert sent <= MAX_HEAD + 2 * 256 * 1024
            assert not slots.open

    asyncio.run(scenario())


def test_a_large_but_bounded_head_sent_in_pieces_is_served() -> None:
    """A 40 KiB head (many headers), sent over several reads, is within the bound and answered."""
    async def scenario() -> None:
        async with connection() as (_, _slots, reader, writer):
            head = b"GET /big HTTP/1.1\r\nHost: t\r\n" + b"".join(
                f"X-H{i}: {'v' * 400}\r\n".encode() for i in range(100)) + b"\r\n"
            assert MAX_HEAD // 2 < len(head) < MAX_HEAD
            for start in range(0, len(head), 4096):
                writer.write(head[start:start + 4096])
                await writer.drain()
                await asyncio.sleep(0.001)
            assert (await read_response(reader))[1] == b"/big:"

    asyncio.run(scenario())
