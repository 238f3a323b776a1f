"""CalmServer: a one-second tick that a request to exit or a signal cuts short."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import threading
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
import uvicorn
from starlette.types import Receive, Scope, Send

from vmm.core.http_server import CalmServer

# Far longer than any test may wait: a server still waiting for its tick shows as a timeout.
NEVER = 3600.0
WAIT = 30.0


async def hello(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"hello"})


class SignallessServer(CalmServer):
    """Leaves signal handlers alone: uvicorn's would re-raise a handled signal at exit."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@contextlib.asynccontextmanager
async def serving(tick: float) -> AsyncIterator[tuple[CalmServer, asyncio.Task[None], str]]:
    """A CalmServer with ``tick`` on 127.0.0.1, started; cancelled if a test leaves it up."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = SignallessServer(uvicorn.Config(hello, lifespan="off", log_config=None,
                                             access_log=False, server_header=False))
    server.tick = tick
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        async with asyncio.timeout(WAIT):
            while not server.started:  # noqa: ASYNC110 - uvicorn's own flag, no event
                await asyncio.sleep(0.01)
        yield server, task, f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        sock.close()


def test_asking_to_exit_stops_the_server_without_waiting_for_its_tick() -> None:
    """ask_exit ends serve() at once, though the next tick is an hour away."""

    async def scenario() -> None:
        async with serving(NEVER) as (server, task, url):
            async with httpx.AsyncClient() as client:
                assert (await client.get(url)).text == "hello"
            server.ask_exit()
            await asyncio.wait_for(task, WAIT)
            assert server.should_exit

    asyncio.run(scenario())


def test_a_signal_stops_the_server_without_waiting_for_its_tick() -> None:
    """A signal handled by handle_exit wakes a server asleep in its selector."""

    async def scenario() -> None:
        async with serving(NEVER) as (server, task, _):
            previous = signal.signal(signal.SIGUSR1, server.handle_exit)
            # Sent from another thread once this one sleeps in its selector: the handler then
            # runs inside the selector's call, which resumes sleeping unless it is woken.
            sender = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGUSR1))
            sender.start()
            try:
                await asyncio.wait_for(task, WAIT)
            finally:
                sender.cancel()
                sender.join(WAIT)
                signal.signal(signal.SIGUSR1, previous)
            assert server.should_exit

    asyncio.run(scenario())


def test_every_tick_refreshes_the_date_header() -> None:
    """Responses carry a Date header, renewed at each tick of the longer loop."""

    async def scenario() -> None:
        async with serving(0.01) as (server, _, url):
            first = server.server_state.default_headers
            async with httpx.AsyncClient() as client:
                assert "date" in (await client.get(url)).headers
            server.server_state.default_headers = []
            async with asyncio.timeout(WAIT):
                while not server.server_state.default_headers:  # noqa: ASYNC110 - uvicorn's state
                    await asyncio.sleep(0.01)
            assert [name for name, _ in server.server_state.default_headers] == \
                [name for name, _ in first] == [b"date"]

    asyncio.run(scenario())


def test_asking_a_server_that_is_not_serving_only_marks_it() -> None:
    """ask_exit before serve() (or after) sets should_exit and touches no loop."""
    server = CalmServer(uvicorn.Config(hello))
    server.ask_exit()
    assert server.should_exit


@pytest.fixture(autouse=True)
def _no_stray_signal_handler() -> None:
    assert signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, signal.SIG_IGN, None)
