"""The daemon's side: an async client for the supervisor, and the helper that starts one.

Every failure surfaces as ``SupervisorError``: a refusal carries the supervisor's own message,
and a transport failure says which socket could not be reached.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

import vmm
from vmm.exceptions import SupervisorError
from vmm.names import VM_ID, check_name
from vmm.supervisor.process_table import STOP_TIMEOUT
from vmm.supervisor.types import ProcessConfig, ProcessInfo

_LOG_TAIL_BYTES = 2000


class SupervisorClient:
    def __init__(self, socket_path: Path, timeout: float = 10.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout
        self._http = httpx.AsyncClient(
            transport=httpx.AsyncHTTPTransport(uds=str(socket_path)),
            # The host part is never resolved: the transport always dials the socket.
            base_url="http://supervisor",
            timeout=timeout,
        )

    async def ping(self) -> bool:
        """Return True if a supervisor answers on the socket."""
        try:
            return bool(await self._call("GET", "/ping") == "pong")
        except SupervisorError:
            return False

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
            response = await self._http.request(
                method,
                path,
                json=json,
                timeout=self.timeout if request_timeout is None else request_timeout,
            )
        except httpx.TimeoutException as exc:
            raise SupervisorError(
                f"supervisor at {self.socket_path} did not answer {method} {path} in time: "
                f"{type(exc).__name__}"
            ) from exc
        except httpx.TransportError as exc:
            raise SupervisorError(
                f"supervisor unreachable at {self.socket_path}: {exc or type(exc).__name__}"
            ) from exc
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
) -> SupervisorClient:
    """Return a client for the supervisor on ``socket_path``, starting one if none answers.

    The new supervisor runs in its own session with no terminal, so it and its children
    outlive this process however it ends. Its stderr goes to the log file, so a supervisor that
    dies before it can log still leaves a reason there.
    """
    client = SupervisorClient(socket_path)
    try:
        if await client.ping():
            return client
        proc = _launch(socket_path, pid_file, log_file, state_file, python)
        exited = threading.Event()
        # The supervisor is our direct child until we die; reap it if it exits first (a
        # refused start, a /shutdown) so it does not linger as a zombie.
        threading.Thread(
            target=_reap, args=(proc, exited), name="supervisor-reaper", daemon=True
        ).start()
        deadline = time.monotonic() + start_timeout
        delay = 0.02
        while True:
            if await client.ping():
                return client
            if exited.is_set():
                # It may have lost a race to a supervisor another launcher started.
                if await client.ping():
                    return client
                raise SupervisorError(
                    f"supervisor exited with code {proc.returncode} before answering on "
                    f"{socket_path}; log tail:\n{_tail(log_file)}"
                )
            if time.monotonic() >= deadline:
                raise SupervisorError(
                    f"supervisor (pid {proc.pid}) did not answer on {socket_path} within "
                    f"{start_timeout:g} s; log tail:\n{_tail(log_file)}"
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.25)
    except BaseException:
        await client.aclose()
        raise


def _launch(
    socket_path: Path, pid_file: Path, log_file: Path, state_file: Path | None, python: str
) -> subprocess.Popen[bytes]:
    argv = [python, "-m", "vmm.supervisor", "--uds", str(socket_path)]
    argv += ["--pid-file", str(pid_file), "--log-file", str(log_file)]
    if state_file is not None:
        argv += ["--state-file", str(state_file)]
    argv.append("--detach")
    env = dict(os.environ)
    # Run the same vmm package as this process, wherever it was imported from.
    package_root = str(Path(vmm.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("ab") as log:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log,
            env=env,
            start_new_session=True,
            close_fds=True,
        )


def _reap(proc: subprocess.Popen[bytes], exited: threading.Event) -> None:
    proc.wait()
    exited.set()


def _tail(log_file: Path) -> str:
    try:
        with log_file.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - _LOG_TAIL_BYTES))
            return f.read().decode(errors="replace")
    except OSError as exc:
        return f"(cannot read {log_file}: {exc})"
