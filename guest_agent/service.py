"""The guest's small HTTP service (TCP 8080): ``GET /`` answers a JSON status document.

Port-mapping tests reach it through QEMU's user-mode ``hostfwd``.
"""

import json
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

DEFAULT_PORT = 8080
SERVICE_NAME = "vmm-guest"

StatusFn = Callable[[], dict[str, object]]


class _Handler(BaseHTTPRequestHandler):
    server: "StatusServer"
    server_version = "vmm-guest"
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] != "/":
            self._send_json(HTTPStatus.NOT_FOUND, {"error": "not found", "path": self.path})
            return
        self._send_json(HTTPStatus.OK, self.server.status())

    def _send_json(self, status: HTTPStatus, body: dict[str, object]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        """Keep the console quiet."""


class StatusServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], status: StatusFn) -> None:
        super().__init__(address, _Handler)
        self.status = status

    @property
    def port(self) -> int:
        return int(self.server_address[1])


def start(status: StatusFn, host: str = "0.0.0.0", port: int = DEFAULT_PORT) -> StatusServer:
    """Bind and serve in a daemon thread; the socket listens when this returns."""
    server = StatusServer((host, port), status)
    threading.Thread(target=server.serve_forever, name="http-service", daemon=True).start()
    return server
