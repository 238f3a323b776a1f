"""Request bookkeeping around every route: request ids, common headers, and the last-resort 500.

Pure ASGI so streamed responses pass through without buffering.
"""

from __future__ import annotations

import json
import logging
import re
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vmm.core.version import __version__

log = logging.getLogger(__name__)

_CLIENT_ID_RE = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")

# On every response, errors included. Without nosniff, Chromium sniffs a streamed text/plain
# body (the /logs follow view) and shows nothing until 1 KiB has arrived; SAMEORIGIN keeps the
# console from being framed by another site.
SECURITY_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"SAMEORIGIN"),
)


class RequestIdMiddleware:
    """Echo a sane ``X-Request-Id`` or make one; add common headers; turn bugs into a 500."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = ""
        for key, value in scope["headers"]:
            if key == b"x-request-id":
                candidate = value.decode("latin-1")
                if _CLIENT_ID_RE.match(candidate):
                    request_id = candidate
                break
        request_id = request_id or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        extra = [
            (b"x-request-id", request_id.encode()),
            (b"x-app-version", __version__.encode()),
            (b"x-accel-buffering", b"no"),
            *SECURITY_HEADERS,
        ]
        started = False

        async def send_with_headers(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message = dict(message)
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                message["headers"] = [*headers, *(h for h in extra if h[0] not in present)]
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        except Exception:
            log.exception(
                "request %s failed: %s %s", request_id, scope.get("method"), scope.get("path")
            )
            if started:
                raise
            text = f"internal error (request id {request_id}); see the daemon log"
            body = json.dumps({"error": text, "message": text, "code": "INTERNAL"}).encode()
            await send_with_headers(
                {
                    "type": "http.response.start",
                    "status": 500,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()),
                    ],
                }
            )
            await send_with_headers({"type": "http.response.body", "body": body})
