"""Listeners: bind every configured address and serve the app on all of them in one process.

Sockets are bound here rather than by uvicorn because uvicorn's ``uds`` mode makes the socket
world-writable; ours is 0600 from the moment it exists (the umask is tightened around bind).
Each listener is served with the connection guard (``vmm.api.connection_guard``): deadlines for
request heads and bodies, and its own connection cap.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import uvicorn
from starlette.types import ASGIApp

from vmm.api.connection_guard import Deadlines, ListenerSlots, ThrottledLog, protocol_factory
from vmm.core.config import Config, ServerConfig, parse_address
from vmm.core.exceptions import ConfigError
from vmm.core.http_server import CalmServer
from vmm.core.unix_socket import SocketPathTaken, bind_private

log = logging.getLogger(__name__)


def bind_tcp(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto must be IPPROTO_TCP explicitly: asyncio only sets TCP_NODELAY on accepted sockets
    # whose proto says TCP, and without it every response stalls ~40 ms on delayed ACKs.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        reason = exc.strerror
        raise ConfigError(f"`address`: cannot listen on tcp:{host}:{port}: {reason}") from None
    sock.listen(1024)
    sock.set_inheritable(False)
    return sock


def bind_vsock(cid: int, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    try:
        sock.bind((cid, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"`host_api`: cannot listen on vsock:{cid}:{port}: {exc.strerror}") from None
    sock.listen(128)
    sock.set_inheritable(False)
    return sock


def bind_unix(path: Path) -> socket.socket:
    """Bind a 0600 Unix socket, replacing a stale socket file but never a live one."""
    try:
        return bind_private(path, backlog=1024)
    except SocketPathTaken as exc:
        raise ConfigError(f"`address`: {exc}") from None


@contextlib.contextmanager
def extra_listener(address: str, key: str) -> Iterator[socket.socket]:
    """Bind one more listener (``metrics_address``); closed, and its socket file removed, after."""
    kind, where, port = parse_address(address)
    path = Path(where).absolute() if kind == "unix" else None
    try:
        sock = bind_tcp(where, port) if path is None else bind_unix(path)
    except ConfigError as exc:
        raise ConfigError(exc.message.replace("`address`", f"`{key}`", 1)) from None
    try:
        yield sock
    finally:
        sock.close()
        if path is not None:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


@contextlib.contextmanager
def listeners(config: Config) -> Iterator[list[socket.socket]]:
    sockets: list[socket.socket] = []
    unix_paths: list[Path] = []
    try:
        for address in config.addresses:
            kind, where, port = parse_address(address)
            if kind == "tcp":
                sockets.append(bind_tcp(where, port))
            else:
                path = Path(where).absolute()
                sockets.append(bind_unix(path))
                unix_paths.append(path)
        yield sockets
    finally:
        for sock in sockets:
            sock.close()
        for path in unix_paths:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def describe(sock: socket.socket) -> str:
    name = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        return f"unix:{name}"
    if sock.family == socket.AF_VSOCK:
        return f"vsock:{name[0]}:{name[1]}"
    return f"tcp:{name[0]}:{name[1]}"


def log_fd_exhaustion_once_per_interval(loop: asyncio.AbstractEventLoop) -> None:
    """Report accept() failing for want of descriptors as one line per interval.

    asyncio logs each failure with a traceback and retries every second, per listener, for as
    long as the descriptors stay exhausted.
    """
    exhausted = ThrottledLog(
        "accepting connections failed %d time(s): out of file descriptors; new connections "
        "wait in the listen backlog until open ones close",
        logger=log,
    )

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE) \
                and "socket" in context:
            exhausted.count()
            return
        loop.default_exception_handler(context)

    loop.set_exception_handler(handler)


class _GuardedServer(CalmServer):
    """A uvicorn server that serves each listener with the connection guard."""

    def __init__(self, config: uvicorn.Config, limits: ServerConfig) -> None:
        super().__init__(config)
        self.limits = limits

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        # Given no sockets, uvicorn runs the lifespan and serves nothing; serving each listener
        # here gives it its own protocol factory, hence its own connection cap.
        await super().startup(sockets=[])
        if self.should_exit:
            return
        loop = asyncio.get_running_loop()
        deadlines = Deadlines(head=self.limits.header_timeout, body=self.limits.body_timeout)
        for sock in sockets or []:
            slots = ListenerSlots(describe(sock), self.limits.max_connections)
            factory = protocol_factory(
                self.config, self.server_state, self.lifespan.state, slots, deadlines
            )
            server = await loop.create_server(factory, sock=sock, backlog=self.config.backlog)
            self.servers.append(server)


class _Server(_GuardedServer):
    """A uvicorn server whose signals only ask it to exit.

    uvicorn re-raises SIGTERM after shutting down, killing the process before our cleanup
    (removing the socket file) runs.
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        handled = (signal.SIGINT, signal.SIGTERM)
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


class _QuietServer(_GuardedServer):
    """A server that leaves signals to the main one."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def serve_quietly(
    app: ASGIApp, sockets: list[socket.socket], limits: ServerConfig | None = None
) -> None:
    """A second, signal-free server (the vsock host API); it stops when cancelled."""
    server = _QuietServer(
        uvicorn.Config(
            app, log_config=None, access_log=False, lifespan="off", server_header=False, ws="none",
            proxy_headers=False,
        ),
        limits or ServerConfig(),
    )
    await server.serve(sockets=sockets)


async def serve(app: ASGIApp, config: Config, sockets: list[socket.socket]) -> None:
    server_config = uvicorn.Config(
        app,
        log_config=None,
        log_level=config.log_level,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=5,
        server_header=False,
        # No route speaks WebSocket, and a connection handed to a WebSocket protocol would
        # escape the connection guard.
        ws="none",
        # The daemon is not behind a proxy it trusts: a client's X-Forwarded-For must not
        # replace the peer address it is logged by (and it saves a layer on every call).
        proxy_headers=False,
    )
    log_fd_exhaustion_once_per_interval(asyncio.get_running_loop())
    server = _Server(server_config, config.server)
    for sock in sockets:
        log.info("listening on %s", describe(sock))
    await server.serve(sockets=sockets)
    # Every listener (uvicorn's, the gRPC and metrics ones) ends in the lifespan; a task still
    # here would be cancelled by asyncio.run without a word, so say which.
    leftover = sorted(t.get_name() for t in asyncio.all_tasks() if t is not asyncio.current_task())
    if leftover:
        log.warning("tasks still running at exit: %s", ", ".join(leftover))
    else:
        log.info("stopped: no tasks left")
