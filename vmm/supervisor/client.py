"""The daemon's side: an async client for the supervisor, and the helper that starts one.

Every failure surfaces as ``SupervisorError``: a refusal carries the supervisor's own message,
and a supervisor that does not answer is a ``SupervisorUnavailable`` (503) naming the socket.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

import vmm
from vmm.core.exceptions import SupervisorError, SupervisorUnavailable
from vmm.core.names import VM_ID, check_name
from vmm.supervisor.process_table import STOP_TIMEOUT
from vmm.supervisor.types import ProcessConfig, ProcessInfo

log = logging.getLogger(__name__)

_LOG_TAIL_BYTES = 2000
# After a failed restart the next waits this many seconds, doubled per failure up to the max:
# a supervisor that cannot start is not relaunched on every call, yet comes back soon once fixed.
RESTART_BACKOFF = 1.0
RESTART_BACKOFF_MAX = 30.0


class SupervisorClient:
    """Calls to one supervisor socket.

    With ``launch`` the client also keeps a supervisor there: when none answers (it was killed,
    or crashed) it starts a new one, which re-adopts the processes still running from its state
    file, and sends the call again. A call is sent again only when that cannot do it twice: its
    connection was refused, so it never arrived, or it is a read. A write cut off mid-way
    fails with ``SupervisorUnavailable`` instead, since it may or may not have taken effect.
    """

    def __init__(
        self, socket_path: Path, timeout: float = 10.0, *, launch: SupervisorLaunch | None = None
    ) -> None:
        self.socket_path = socket_path
        self.timeout = timeout
        self._restarts = _Restarts(launch) if launch is not None else None
        self._http = httpx.AsyncClient(
            transport=httpx.AsyncHTTPTransport(uds=str(socket_path)),
            # The host part is never resolved: the transport always dials the socket.
            base_url="http://supervisor",
            timeout=timeout,
        )

    async def ping(self) -> bool:
        """Return True if a supervisor answers on the socket; never starts one."""
        try:
            return bool(await self._send("GET", "/ping") == "pong")
        except (SupervisorError, _NoAnswer):
            return False

    async def check(self) -> None:
        """Return once a supervisor answers (after a restart if need be); else raise."""
        await self._call("GET", "/ping")

    async def deploy(self, config: ProcessConfig) -> None:
        await self._call("POST", "/deploy", json=config.to_json())

    async def start(self, id: str) -> None:
        await self._call("POST", f"/start/{_seg(id)}")

    async def stop(self, id: str) -> None:
        # The supervisor waits up to STOP_TIMEOUT for the kill to land; do not give up first.
        await self._call("POST", f"/stop/{_seg(id)}", request_timeout=self.timeout + STOP_TIMEOUT)

    async def remove(self, id: str) -> None:
        await self._call("DELETE", f"/remove/{_seg(id)}")

    async def list(self) -> list[ProcessInfo]:
        data = await self._call("GET", "/list")
        if not isinstance(data, list):
            raise SupervisorError(f"bad reply from supervisor to /list: {data!r:.200}")
        return [_info(item) for item in data]

    async def info(self, id: str) -> ProcessInfo | None:
        data = await self._call("GET", f"/info/{_seg(id)}")
        return None if data is None else _info(data)

    async def clear(self) -> None:
        await self._call("POST", "/clear")

    async def shutdown(self) -> None:
        """Stop every process and make the supervisor exit."""
        await self._call("POST", "/shutdown", request_timeout=self.timeout + STOP_TIMEOUT)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> SupervisorClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def _call(
        self, method: str, path: str, *, json: Any = None, request_timeout: float | None = None
    ) -> Any:
        try:
            return await self._send(method, path, json, request_timeout)
        except _NoAnswer as failure:
            if self._restarts is None or not failure.dead:
                raise failure.error from None
            await self._restarts.restart(self.ping, failure.error.message)
            if not failure.unsent and method != "GET":
                raise SupervisorUnavailable(
                    f"the supervisor stopped answering during {method} {path} and was restarted;"
                    " whether the request took effect is unknown, so retry it"
                ) from None
        # Sent to the new supervisor: the dead one never got it, or it is a read.
        try:
            return await self._send(method, path, json, request_timeout)
        except _NoAnswer as failure:
            raise failure.error from None

    async def _send(
        self, method: str, path: str, json: Any = None, request_timeout: float | None = None
    ) -> Any:
        try:
            response = await self._http.request(
                method,
                path,
                json=json,
                timeout=self.timeout if request_timeout is None else request_timeout,
            )
        except httpx.TimeoutException as exc:
            # Alive but slow (or stopped): a second supervisor could not take over its lock.
            raise _NoAnswer(SupervisorUnavailable(
                f"supervisor at {self.socket_path} did not answer {method} {path} in time: "
                f"{type(exc).__name__}"
            ), dead=False, unsent=False) from exc
        except (httpx.TransportError, OSError) as exc:
            if _out_of_descriptors(exc):
                # Our shortage, not the supervisor's death: restarting it would not help, and
                # would start a second one beside a healthy supervisor.
                raise _NoAnswer(SupervisorUnavailable(
                    f"cannot reach the supervisor at {self.socket_path}: this process is out "
                    "of file descriptors"
                ), dead=False, unsent=True) from exc
            # A connection that failed, or a socket that could not even be made, sent nothing.
            unsent = isinstance(exc, httpx.ConnectError | OSError)
            raise _NoAnswer(SupervisorUnavailable(
                f"supervisor unreachable at {self.socket_path}: {exc or type(exc).__name__}"
            ), dead=True, unsent=unsent) from exc
        try:
            body = response.json()
        except ValueError:
            body = None
        if not response.is_success:
            if isinstance(body, dict) and isinstance(body.get("error"), str):
                raise SupervisorError(body["error"])
            raise SupervisorError(
                f"supervisor answered {method} {path} with HTTP {response.status_code}: "
                f"{response.text[:200]}"
            )
        if not isinstance(body, dict) or "data" not in body:
            raise SupervisorError(f"bad reply from supervisor to {path}: {response.text[:200]}")
        return body["data"]


class _NoAnswer(Exception):
    """A call got no reply.

    ``dead``: nothing serves the socket any more (not merely slow); ``unsent``: the connection
    was refused, so the supervisor never saw the request.
    """

    def __init__(self, error: SupervisorUnavailable, *, dead: bool, unsent: bool) -> None:
        super().__init__(error.message)
        self.error = error
        self.dead = dead
        self.unsent = unsent


@dataclass(frozen=True)
class SupervisorLaunch:
    """How to start a supervisor: where it serves, logs and keeps its table, and with what."""

    socket_path: Path
    pid_file: Path
    log_file: Path
    state_file: Path | None = None
    python: str = sys.executable
    start_timeout: float = 10.0


class _Restarts:
    """Restarts of one supervisor: one at a time, with a growing pause after each failure.

    Callers that find the supervisor dead while a restart runs wait for it and then use the new
    supervisor; during the pause after a failed restart they fail at once with the reason,
    rather than each launching a supervisor that is bound to fail the same way.
    """

    def __init__(self, launch: SupervisorLaunch) -> None:
        self.launch = launch
        self._lock = asyncio.Lock()
        self._failures = 0
        self._next_attempt = 0.0
        self._last_error = ""

    async def restart(self, ping: Callable[[], Awaitable[bool]], reason: str) -> None:
        """Make a supervisor answer again, or raise SupervisorUnavailable saying why not."""
        sock = self.launch.socket_path
        async with self._lock:
            if await ping():
                return  # the restart we waited for worked, or it came back by itself
            wait = self._next_attempt - time.monotonic()
            if wait > 0:
                raise SupervisorUnavailable(
                    f"the supervisor at {sock} is down and {self._failures} restart(s) failed; "
                    f"next attempt in {wait:.1f} s; last failure: {self._last_error}"
                )
            log.warning("supervisor at %s does not answer (%s); starting a new one", sock, reason)
            try:
                await _start(ping, self.launch)
            except SupervisorError as exc:
                self._failures += 1
                pause = min(RESTART_BACKOFF * 2 ** (self._failures - 1), RESTART_BACKOFF_MAX)
                self._next_attempt = time.monotonic() + pause
                self._last_error = exc.message
                log.error("restarting the supervisor failed (%d in a row; next attempt in %g s):"
                          " %s", self._failures, pause, exc.message)
                raise SupervisorUnavailable(
                    f"the supervisor at {sock} is down and restarting it failed: {exc.message}"
                ) from None
            self._failures, self._next_attempt, self._last_error = 0, 0.0, ""
            log.warning("supervisor restarted (pid %s) on %s; it re-adopts the processes that "
                        "still run", _read_pid(self.launch.pid_file), sock)


def _out_of_descriptors(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is EMFILE/ENFILE: this process ran out of fds."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return False
        if isinstance(seen, OSError) and seen.errno in (errno.EMFILE, errno.ENFILE):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _seg(id: str) -> str:
    """``id`` as one URL path segment; '..' or '.' would be collapsed by URL normalisation."""
    return quote(check_name(id, "id", VM_ID), safe="")


def _info(data: object) -> ProcessInfo:
    try:
        return ProcessInfo.from_json(data)
    except ValueError as exc:
        raise SupervisorError(f"bad process info from supervisor: {exc}") from exc


async def ensure_supervisor(
    socket_path: Path,
    pid_file: Path,
    log_file: Path,
    *,
    state_file: Path | None = None,
    python: str = sys.executable,
    start_timeout: float = 10.0,
    restart: bool = False,
) -> SupervisorClient:
    """Return a client for the supervisor on ``socket_path``, starting one if none answers.

    The new supervisor runs in its own session with no terminal, so it and its children
    outlive this process however it ends. Its stderr goes to the log file, so a supervisor that
    dies before it can log still leaves a reason there. With ``restart`` the client starts a
    new one whenever it finds the supervisor dead (see ``SupervisorClient``).
    """
    launch = SupervisorLaunch(socket_path, pid_file, log_file, state_file, python, start_timeout)
    client = SupervisorClient(socket_path, launch=launch if restart else None)
    try:
        if not await client.ping():
            await _start(client.ping, launch)
        return client
    except BaseException:
        await client.aclose()
        raise


async def _start(ping: Callable[[], Awaitable[bool]], launch: SupervisorLaunch) -> None:
    """Launch a supervisor and wait until one answers; raise SupervisorError if none does."""
    # The reason a start fails is in what this supervisor logs, not in earlier runs' lines.
    log_offset = _size(launch.log_file)
    try:
        proc = _launch(launch)
    except OSError as exc:
        raise SupervisorError(f"cannot launch a supervisor for {launch.socket_path}: {exc}") from exc
    exited = threading.Event()
    # The supervisor is our direct child until we die; reap it if it exits first (a refused
    # start, a /shutdown, a kill) so it does not linger as a zombie.
    threading.Thread(
        target=_reap, args=(proc, exited), name="supervisor-reaper", daemon=True
    ).start()
    deadline = time.monotonic() + launch.start_timeout
    delay = 0.02
    while True:
        if await ping():
            return
        if exited.is_set():
            # It may have lost a race to a supervisor another launcher started.
            if await ping():
                return
            raise SupervisorError(
                f"supervisor exited with code {proc.returncode} before answering on "
                f"{launch.socket_path}; its log:\n{_tail(launch.log_file, log_offset)}"
            )
        if time.monotonic() >= deadline:
            raise SupervisorError(
                f"supervisor (pid {proc.pid}) did not answer on {launch.socket_path} within "
                f"{launch.start_timeout:g} s; its log:\n{_tail(launch.log_file, log_offset)}"
            )
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.25)


def _launch(launch: SupervisorLaunch) -> subprocess.Popen[bytes]:
    log_file = launch.log_file
    argv = [launch.python, "-m", "vmm.supervisor", "--uds", str(launch.socket_path)]
    argv += ["--pid-file", str(launch.pid_file), "--log-file", str(log_file)]
    if launch.state_file is not None:
        argv += ["--state-file", str(launch.state_file)]
    argv.append("--detach")
    env = dict(os.environ)
    # Run the same vmm package as this process, wherever it was imported from.
    package_root = str(Path(vmm.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("ab") as stderr:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env=env,
            start_new_session=True,
            close_fds=True,
        )


def _reap(proc: subprocess.Popen[bytes], exited: threading.Event) -> None:
    proc.wait()
    exited.set()


def _read_pid(pid_file: Path) -> str:
    try:
        return pid_file.read_text().strip()
    except OSError:
        return "?"


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _tail(log_file: Path, start: int) -> str:
    """What was written to the log since ``start``, at most its last _LOG_TAIL_BYTES."""
    try:
        with log_file.open("rb") as f:
            f.seek(0, os.SEEK_END)
            end = f.tell()
            # A log rotated meanwhile is shorter than ``start``: then all of it is new.
            f.seek(max(0 if end < start else start, end - _LOG_TAIL_BYTES))
            return f.read().decode(errors="replace")
    except OSError as exc:
        return f"(cannot read {log_file}: {exc})"
