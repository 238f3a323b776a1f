"""The request middleware: request ids, common headers, and the last-resort 500."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Iterator

import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tests.conftest import populate_images
from tests.support import short_dirs
from tests.support.daemon_proc import DaemonProcess, running_daemon
from tests.support.vm_ops import FAKE_IMAGE, create
from vmm.api.middleware import RequestIdMiddleware

TOKEN = "headers-token"


async def boom(request: Request) -> Response:
    raise RuntimeError("a bug")


async def fine(request: Request) -> Response:
    return Response(b"ok")


async def framed(request: Request) -> Response:
    return Response(b"ok", headers={"X-Frame-Options": "DENY"})


APP = Starlette(routes=[Route("/boom", boom), Route("/fine", fine), Route("/framed", framed)],
                middleware=[Middleware(RequestIdMiddleware)])


def assert_security_headers(response: httpx.Response) -> None:
    assert response.headers["x-content-type-options"] == "nosniff", response.headers
    assert response.headers["x-frame-options"] == "SAMEORIGIN", response.headers


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


def test_every_answer_carries_nosniff_and_sameorigin() -> None:
    """Both security headers are on answers and on the last-resort 500."""
    assert_security_headers(asyncio.run(get("/fine")))
    assert_security_headers(asyncio.run(get("/boom")))


def test_a_route_choice_of_frame_options_is_kept_not_doubled() -> None:
    """A route that sets X-Frame-Options itself keeps its value, sent once."""
    response = asyncio.run(get("/framed"))
    assert response.headers.get_list("x-frame-options") == ["DENY"]
    assert response.headers["x-content-type-options"] == "nosniff"


@pytest.fixture(scope="module")
def secured() -> Iterator[DaemonProcess]:
    """A real daemon with auth on, placeholder images, and a stopped VM with a serial log."""
    with short_dirs.short_dir("vmmhdr") as workdir:
        populate_images(workdir / "state" / "images")
        with running_daemon(
            workdir, extra_config=f'[auth]\nenabled = true\ntokens = ["{TOKEN}"]\n'
        ) as daemon:
            yield daemon


def test_real_daemon_answers_carry_the_security_headers(secured: DaemonProcess) -> None:
    """200, 401, 404, 405, 413 and a streamed /logs answer all carry both headers."""
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with secured.client(headers=auth) as client, secured.client() as anonymous:
        vm_id = create(client, image=FAKE_IMAGE, stopped=True)
        (secured.workdir / "state" / "vm" / vm_id / "serial.log").write_text("booting\n")
        answers = {
            "ok": client.post("/prpc/Version?json"),
            "unauthorized": anonymous.post("/prpc/Version?json"),
            "no route": client.get("/nowhere"),
            "bad method": client.put("/prpc/Version"),
            "too large": client.post("/prpc/Version?json", content=b" " * (11 * 1024 * 1024)),
        }
        with client.stream("GET", "/logs", params={"id": vm_id, "follow": "false"}) as logs:
            answers["logs"] = logs
            assert logs.headers["content-type"].startswith("text/plain")
            assert b"booting" in logs.read()
    statuses = {name: answer.status_code for name, answer in answers.items()}
    assert statuses == {"ok": 200, "unauthorized": 401, "no route": 404, "bad method": 405,
                        "too large": 413, "logs": 200}
    for answer in answers.values():
        assert_security_headers(answer)


def test_a_malformed_request_gets_a_400_with_the_security_headers(secured: DaemonProcess) -> None:
    """The server's own 400 for bytes that are not HTTP carries both headers too."""
    host, port = secured.base_url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head = answer.partition(b"\r\n\r\n")[0].lower()
    assert head.startswith(b"http/1.1 400")
    assert b"x-content-type-options: nosniff" in head
    assert b"x-frame-options: sameorigin" in head
