"""A real uvicorn server in a background thread, for HTTP-level tests of one Starlette app."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn
from starlette.types import ASGIApp


@contextmanager
def serve_in_thread(app: ASGIApp, *, start_timeout: float = 20.0) -> Iterator[str]:
    """Serve ``app`` on 127.0.0.1 (a free port) and yield its base URL; stop it on exit."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    # log_config=None leaves uvicorn's loggers propagating to the root logger, where caplog
    # can see whether anything was logged as an error.
    config = uvicorn.Config(
        app, log_config=None, lifespan="off", access_log=False, timeout_graceful_shutdown=3
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="log-server", daemon=True
    )
    thread.start()
    try:
        deadline = time.monotonic() + start_timeout
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("the test server thread died while starting")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the test server did not start in {start_timeout} s")
            time.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()
