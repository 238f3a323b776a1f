"""A real key provider for tests: 4-byte big-endian length + JSON each way, over TCP."""

from __future__ import annotations

import hashlib
import json
import socketserver
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager


def sealed_for(quote: bytes) -> tuple[bytes, bytes]:
    """What the peer answers for a quote: (encrypted_key, provider_quote)."""
    return hashlib.sha256(b"sealed" + quote).digest(), b"provider-quote:" + quote[:8]


@contextmanager
def key_provider_peer() -> Iterator[tuple[str, int, list[bytes]]]:
    quotes: list[bytes] = []

    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            (length,) = struct.unpack(">I", self._exactly(4))
            quote = bytes(json.loads(self._exactly(length))["quote"])
            quotes.append(quote)
            key, provider_quote = sealed_for(quote)
            answer = json.dumps({"encrypted_key": list(key), "provider_quote": list(provider_quote)})
            self.request.sendall(struct.pack(">I", len(answer)) + answer.encode())

        def _exactly(self, size: int) -> bytes:
            data = b""
            while len(data) < size:
                chunk = self.request.recv(size - len(data))
                if not chunk:
                    raise ConnectionError("peer closed")
                data += chunk
            return data

    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield "127.0.0.1", server.server_address[1], quotes
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
