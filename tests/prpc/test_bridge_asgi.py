"""The bridge's route as a plain ASGI app: same answers and errors as a Starlette handler, less work."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Message

from vmm.api.app import build_app
from vmm.api.middleware import RequestIdMiddleware
from vmm.core.config import Config
from vmm.daemon import Daemon
from vmm.prpc.bridge import CallContext, PrpcBridge
from vmm.rpc import kms_rpc_pb2 as kpb

KEY = b"\x02" * 33


class Kms:
    """A one-method servicer: answers a key, or fails like a bug when asked for app 0xdead."""

    async def GetAppEnvEncryptPubKey(self, request: kpb.AppId, ctx: CallContext) -> kpb.PublicKeyResponse:
        if request.app_id == b"\xde\xad":
            raise RuntimeError("a bug")
        return kpb.PublicKeyResponse(public_key=KEY)


def kms_app() -> tuple[Starlette, list[tuple[str, str]]]:
    heard: list[tuple[str, str]] = []
    bridge = PrpcBridge(kpb.DESCRIPTOR.services_by_name["KMS"], Kms(), max_body=1024)
    bridge.observer = lambda method, code, _seconds: heard.append((method, code))
    app = Starlette(routes=[bridge.route("/prpc")], middleware=[Middleware(RequestIdMiddleware)])
    return app, heard


async def post(app: Any, path: str, **kwargs: Any) -> httpx.Response:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://vmm") as client:
        return await client.post(path, **kwargs)


@pytest.mark.parametrize(("query", "media_type"), [("?json", "application/json"),
                                                   ("", "application/octet-stream")])
def test_answers_carry_the_headers_a_starlette_response_would(query: str, media_type: str) -> None:
    """Content-Type and Content-Length, as a starlette Response of the same body sets them."""
    app, _ = kms_app()
    body = b'{"app_id": "1234"}' if query else kpb.AppId(app_id=b"\x12\x34").SerializeToString()
    answer = asyncio.run(post(app, f"/prpc/GetAppEnvEncryptPubKey{query}", content=body))
    assert answer.status_code == 200
    expected = Response(answer.content, media_type=media_type).headers
    assert answer.headers["content-type"] == expected["content-type"] == media_type
    assert answer.headers["content-length"] == expected["content-length"]
    if query:
        assert answer.json()["public_key"] == KEY.hex()
    else:
        assert kpb.PublicKeyResponse.FromString(answer.content).public_key == KEY


def test_a_handler_bug_reaches_the_last_resort_500() -> None:
    """An exception a handler did not expect is the middleware's 500, and the observer hears it."""
    app, heard = kms_app()
    answer = asyncio.run(post(app, "/prpc/GetAppEnvEncryptPubKey?json",
                              json={"app_id": "dead"}, headers={"X-Request-Id": "req-7"}))
    assert answer.status_code == 500
    assert answer.json()["code"] == "INTERNAL"
    assert "req-7" in answer.json()["error"]
    assert heard == [("GetAppEnvEncryptPubKey", "INTERNAL")]


@pytest.fixture(scope="module")
def daemon_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Starlette]:
    """The daemon's real app (not started: Version needs nothing) with a bare route in front."""
    workdir: Path = tmp_path_factory.mktemp("app")
    config = Config(address="tcp:127.0.0.1:1", run_path=str(workdir / "vm"))
    app = build_app(Daemon(config))

    async def bare(request: Request) -> Response:
        return Response(b'{"version":"0.1.0"}', media_type="application/json")

    app.router.routes.insert(0, Route("/bare", bare, methods=["GET", "POST"]))
    yield app


def python_calls(app: Starlette, path: str) -> int:
    """Python function calls made by one JSON POST of ``{}`` to ``path`` through the whole app."""
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "",
        "query_string": b"", "server": ("127.0.0.1", 1), "client": ("127.0.0.1", 2), "app": app,
        "headers": [(b"host", b"vmm"), (b"content-type", b"application/json"),
                    (b"content-length", b"2")],
    }
    sent: list[Message] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    calls = 0

    def count(frame: FrameType, event: str, arg: object) -> None:
        nonlocal calls
        calls += event == "call"

    async def one() -> None:
        sys.setprofile(count)
        try:
            await app(scope, receive, send)
        finally:
            sys.setprofile(None)

    asyncio.run(one())
    assert sent[0]["status"] == 200, sent
    return calls


def test_a_prpc_call_costs_about_what_a_bare_route_costs(daemon_app: Starlette) -> None:
    """/prpc/Version runs at most 30 Python calls more than a bare route in front of it.

    The bridge as a Starlette request handler ran 67 more; reading the body, the body budget,
    the read gate (with its once-a-turn callback) and the metrics observer need about 27.
    """
    python_calls(daemon_app, "/prpc/Version")  # first calls fill caches
    bare = python_calls(daemon_app, "/bare")
    bridge = python_calls(daemon_app, "/prpc/Version")
    assert bridge <= bare + 30, (bridge, bare)
