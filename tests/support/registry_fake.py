"""A registry that answers what a test scripts: garbage, lies about digests, wrong types.

The real registry never misbehaves on purpose, so the client's defences against a broken or
hostile one are pinned against this plain-HTTP server on a loopback port instead.
"""

from __future__ import annotations

import contextlib
import http.server
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field


@dataclass
class Answer:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class FakeRegistry:
    port: int
    routes: dict[str, Answer]
    requests: list[str] = field(default_factory=list)

    @property
    def ref(self) -> str:
        return f"127.0.0.1:{self.port}/guest/dstack"


@contextlib.contextmanager
def fake_registry(routes: dict[str, Answer]) -> Iterator[FakeRegistry]:
    """Serve ``routes`` (path → Answer; anything else is a 404) until the block ends."""
    fake = FakeRegistry(0, routes)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            fake.requests.append(self.path)
            answer = fake.routes.get(self.path.split("?")[0], Answer(404, b"{}"))
            self.send_response(answer.status)
            for name, value in answer.headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(answer.body)))
            self.end_headers()
            self.wfile.write(answer.body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    fake.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
