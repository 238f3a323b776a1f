"""The supervisor process: an HTTP/JSON API over a Unix socket in front of a ``ProcessTable``.

Replies are ``{"data": <T>}`` (200) or ``{"error": "<msg>"}`` with 400 (bad input, failed
spawn), 404 (unknown id), 409 (wrong state, e.g. removing a running process) and 500 (a bug).

Lifetime rules, all chosen so VMs outlive both the daemon and the supervisor itself:

- The launcher starts us in a new session, so a signal to the daemon's process group or the
  daemon's death does not reach us; SIGHUP is logged and ignored.
- SIGTERM / SIGINT stop serving and exit 0 WITHOUT touching the children; the next supervisor
  re-adopts them from the state file. Only ``POST /shutdown`` kills them.
- One supervisor per socket: a ``<socket>.lock`` flock is held for the process's life, and a
  socket that still answers is never replaced (exit code 2).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import logging.handlers
import os
import signal
import socket
import sys
from collections.abc import Callable, Generator
from dataclasses import dataclass
from json import JSONDecodeError
from pathlib import Path
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.convertors import PathConvertor, register_url_convertor
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from vmm.core.exceptions import BadRequest, VmmError
from vmm.core.http_server import CalmServer
from vmm.core.names import VM_ID, check_name
from vmm.core.unix_socket import SocketPathTaken, bind_private
from vmm.supervisor.files import atomic_write
from vmm.supervisor.process_table import ProcessTable
from vmm.supervisor.types import ProcessConfig

log = logging.getLogger("vmm.supervisor")

EXIT_OK = 0
EXIT_STARTUP = 2


@dataclass(frozen=True)
class Options:
    uds: Path
    pid_file: Path
    log_file: Path
    state_file: Path


class StartupError(Exception):
    """The supervisor must not start; the message says why."""


class _AnyId(PathConvertor):
    """``path`` that also spans newlines, so every id reaches the name check and gets its 400."""

    regex = "(?s:.*)"


register_url_convertor("any_id", _AnyId())


# ---- HTTP API ----------------------------------------------------------------------------


def build_app(table: ProcessTable, request_exit: Callable[[], None]) -> Starlette:
    def ok(data: Any = None, background: BackgroundTask | None = None) -> JSONResponse:
        return JSONResponse({"data": data}, background=background)

    async def deploy(request: Request) -> JSONResponse:
        try:
            body = await request.json()
        except (JSONDecodeError, UnicodeDecodeError) as exc:
            raise BadRequest(f"body is not valid JSON: {exc}") from None
        try:
            config = ProcessConfig.from_json(body)
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        table.deploy(config)
        return ok()

    def id_of(request: Request) -> str:
        return check_name(request.path_params["id"], "id", VM_ID)

    async def start(request: Request) -> JSONResponse:
        table.start(id_of(request))
        return ok()

    async def stop(request: Request) -> JSONResponse:
        await table.stop(id_of(request))
        return ok()

    async def remove(request: Request) -> JSONResponse:
        table.remove(id_of(request))
        return ok()

    async def list_(request: Request) -> JSONResponse:
        return ok([info.to_json() for info in table.list()])

    async def info(request: Request) -> JSONResponse:
        found = table.info(id_of(request))
        return ok(found.to_json() if found else None)

    async def ping(request: Request) -> JSONResponse:
        return ok("pong")

    async def clear(request: Request) -> JSONResponse:
        table.clear()
        return ok()

    async def shutdown(request: Request) -> JSONResponse:
        log.info("shutdown requested: stopping every running process")
        await table.shutdown()
        # Exit only after the reply is on the wire, so the caller learns it worked.
        return ok(background=BackgroundTask(request_exit))

    async def refused(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, VmmError)
        log.info("%s %s refused: %s", request.method, request.url.path, exc.message)
        return JSONResponse({"error": exc.message}, status_code=exc.status_code)

    async def bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path, exc_info=exc)
        return JSONResponse({"error": f"internal error: {exc!r}"}, status_code=500)

    return Starlette(
        routes=[
            Route("/deploy", deploy, methods=["POST"]),
            Route("/start/{id:any_id}", start, methods=["POST"]),
            Route("/stop/{id:any_id}", stop, methods=["POST"]),
            Route("/remove/{id:any_id}", remove, methods=["DELETE"]),
            Route("/list", list_, methods=["GET"]),
            Route("/info/{id:any_id}", info, methods=["GET"]),
            Route("/ping", ping, methods=["GET"]),
            Route("/clear", clear, methods=["POST"]),
            Route("/shutdown", shutdown, methods=["POST"]),
        ],
        exception_handlers={VmmError: refused, Exception: bug},
    )


# ---- process lifetime --------------------------------------------------------------------


class _Server(CalmServer):
    """uvicorn's server minus its signal handling, and asleep while idle (``CalmServer``).

    uvicorn re-raises a captured SIGTERM after a graceful shutdown, which would turn our clean
    exit into death-by-signal; the supervisor installs its own handlers on the loop instead.
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def run(options: Options) -> int:
    """Run a supervisor until asked to exit; return the process exit code."""
    _reset_inherited_ignores()
    _setup_logging(options.log_file)
    try:
        lock_fd = _lock(options.uds)
        sock = _bind(options.uds)
    except StartupError as exc:
        log.error("not starting: %s", exc)
        print(f"vmm-supervisor: not starting: {exc}", file=sys.stderr)  # noqa: T201
        return EXIT_STARTUP
    bound = options.uds.stat()
    try:
        options.pid_file.parent.mkdir(parents=True, exist_ok=True)
        options.state_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(options.pid_file, f"{os.getpid()}\n".encode())
        # The supervisor pins no directory (it may run for months), and relative paths in
        # process configs have no meaning here: every path we got is already absolute.
        os.chdir("/")
        return asyncio.run(_serve(options, sock))
    finally:
        sock.close()
        _remove_if_ours(options.uds, bound)
        with contextlib.suppress(OSError):
            if options.pid_file.read_text().strip() == str(os.getpid()):
                options.pid_file.unlink()
        os.close(lock_fd)
        log.info("supervisor %d exited", os.getpid())


async def _serve(options: Options, sock: socket.socket) -> int:
    loop = asyncio.get_running_loop()
    table = ProcessTable(options.state_file)
    try:
        table.load()
    except ValueError as exc:
        log.error("not starting: %s", exc)
        print(f"vmm-supervisor: not starting: {exc}", file=sys.stderr)  # noqa: T201
        return EXIT_STARTUP

    def request_exit() -> None:
        server.ask_exit()

    server = _Server(
        uvicorn.Config(
            build_app(table, request_exit),
            lifespan="off",
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=5,
        )
    )
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _on_exit_signal, sig, request_exit)
    # A handler rather than SIG_IGN: an ignored disposition would be inherited by the children
    # across exec, and QEMU should keep default signal behaviour.
    loop.add_signal_handler(signal.SIGHUP, log.info, "ignoring SIGHUP")
    log.info("supervisor %d serving on %s (state %s)", os.getpid(), options.uds, options.state_file)
    try:
        await server.serve(sockets=[sock])
    finally:
        table.close()
    return EXIT_OK


def _on_exit_signal(sig: int, request_exit: Callable[[], None]) -> None:
    log.info("%s: exiting, leaving children running", signal.Signals(sig).name)
    request_exit()


def _reset_inherited_ignores() -> None:
    """Give back default dispositions to signals an ancestor ignored.

    Ignored signals survive exec, so whatever ignored SIGQUIT or SIGINT above us (a background
    shell job, ``nohup``) would otherwise reach every VM. SIGPIPE and SIGXFSZ are Python's own
    choice and ``Popen(restore_signals=True)`` resets them in each child already.
    """
    keep = {signal.SIGKILL, signal.SIGSTOP, signal.SIGPIPE, signal.SIGXFSZ}
    for sig in signal.valid_signals():
        if sig in keep:
            continue
        with contextlib.suppress(OSError, ValueError):
            if signal.getsignal(sig) == signal.SIG_IGN:
                signal.signal(sig, signal.SIG_DFL)


def _setup_logging(log_file: Path) -> None:
    log_file.parent.mkdir(parents=True, exist_ok=True)
    # Watched: if the log is rotated by renaming, we follow the new file.
    handler = logging.handlers.WatchedFileHandler(log_file)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)


def _lock(uds: Path) -> int:
    uds.parent.mkdir(parents=True, exist_ok=True)
    lock_path = uds.with_name(uds.name + ".lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StartupError(
            f"another supervisor holds {lock_path}: one is already running for {uds}"
        ) from None
    return fd


def _bind(uds: Path) -> socket.socket:
    try:
        return bind_private(uds)
    except SocketPathTaken as exc:
        raise StartupError(str(exc)) from None


def _remove_if_ours(uds: Path, bound: os.stat_result) -> None:
    with contextlib.suppress(OSError):
        now = uds.lstat()
        if (now.st_dev, now.st_ino) == (bound.st_dev, bound.st_ino):
            uds.unlink()
