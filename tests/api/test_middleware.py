"""The request middleware: request ids, common headers, and the last-resort 500."""

from __future__ import annotations

import asyncio
import logging

import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from vmm.api.middleware import RequestIdMiddleware


async def boom(request: Request) -> Response:
    raise RuntimeError("a bug")


async def fine(request: Request) -> Response:
    return Response(b"ok")


APP = Starlette(routes=[Route("/boom", boom), Route("/fine", fine)],
                middleware=[Middleware(RequestIdMiddleware)])


async def get(path: str, headers: dict[str, str] | None = None) -> httpx.Response:
    transport = httpx.ASGITransport(app=APP, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://vmm") as client:
        return await client.get(path, headers=headers)


def test_a_bug_is_a_logged_500_with_the_request_id(caplog: pytest.LogCaptureFixture) -> None:
    """An unexpected exception becomes a JSON 500 naming the request id, logged with a trace."""
    with caplog.at_level(logging.ERROR, logger="vmm.api.middleware"):
        response = asyncio.run(get("/boom", {"X-Request-Id": "req-42"}))
    assert response.status_code == 500
    assert response.headers["x-request-id"] == "req-42"
    assert response.json()["code"] == "INTERNAL"
    assert "req-42" in response.json()["error"]
    assert "a bug" not in response.text  # internals stay in the log
    (record,) = [r for r in caplog.records if "req-42" in r.getMessage()]
    assert record.exc_info is not None and "a bug" in str(record.exc_info[1])


def test_normal_answers_carry_the_headers() -> None:
    """Successful answers carry X-Request-Id, X-App-Version and X-Accel-Buffering."""
    response = asyncio.run(get("/fine"))
    assert response.status_code == 200
    assert len(response.headers["x-request-id"]) == 32
    assert response.headers["x-app-version"] == "0.1.0"
    assert response.headers["x-accel-buffering"] == "no"
