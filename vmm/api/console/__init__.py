"""The web console: static files from package data, served at ``/`` (also ``/v0``, ``/v1``, ``/beta``).

The page is plain ES modules and CSS with no build step and no third-party code; every URL it uses
is relative, so it works behind a forwarded port or an SSH tunnel to the Unix socket. The page and
its files (``/res/console/...``) load without credentials (see ``vmm.api.auth``); the API calls
it makes carry the token the operator typed, kept in the browser's localStorage.
"""

from __future__ import annotations

import functools
from importlib import resources

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

PAGE_PATHS = ("/", "/v0", "/v1", "/beta")
ASSETS = {
    "app.js": "text/javascript; charset=utf-8",
    "api.js": "text/javascript; charset=utf-8",
    "deploy.js": "text/javascript; charset=utf-8",
    "details.js": "text/javascript; charset=utf-8",
    "system.js": "text/javascript; charset=utf-8",
    "crypto.js": "text/javascript; charset=utf-8",
    "util.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
# The console's own files: no inline script, nothing from another origin.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'")


@functools.cache
def _read(name: str) -> bytes:
    return (resources.files(__name__) / name).read_bytes()


def console_routes() -> list[Route]:
    async def page(request: Request) -> Response:
        return Response(_read("index.html"), media_type="text/html; charset=utf-8",
                        headers={"content-security-policy": CSP, "cache-control": "no-cache"})

    async def asset(request: Request) -> Response:
        name = request.path_params["name"]
        media_type = ASSETS.get(name)
        if media_type is None:
            message = f"no such console file: {name}"
            return JSONResponse({"error": message, "message": message, "code": "NOT_FOUND"},
                                status_code=404)
        return Response(_read(name), media_type=media_type, headers={"cache-control": "no-cache"})

    return [
        *(Route(path, page, methods=["GET"]) for path in PAGE_PATHS),
        Route("/res/console/{name}", asset, methods=["GET"]),
    ]
