"""Real supervisor processes for tests: start one, wait until it answers, end it by pid.

Every helper that waits takes a timeout. Cleanup kills by pid only, and only processes whose
start time still matches what the supervisor recorded, so a reused pid is never hit.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from vmm.supervisor.client import SupervisorClient
from vmm.supervisor.procfs import read_stat
from vmm.supervisor.types import ProcessConfig, ProcessInfo, Status

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class SupervisorPaths:
    root: Path
    sock: Path
    pid_file: Path
    log_file: Path
    state_file: Path

    @classmethod
    def in_dir(cls, root: Path) -> SupervisorPaths:
        return cls(
            root=root,
            sock=root / "s.sock",
            pid_file=root / "supervisor.pid",
            log_file=root / "supervisor.log",
            state_file=root / "supervisor-state.json",
        )

    def argv(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "vmm.supervisor",
            "--uds",
            str(self.sock),
            "--pid-file",
            str(self.pid_file),
            "--log-file",
            str(self.log_file),
            "--state-file",
            str(self.state_file),
        ]

    def log_text(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    return env


def spawn_supervisor(paths: SupervisorPaths) -> subprocess.Popen[bytes]:
    """Start a supervisor without waiting; its stderr goes to ``root/stderr``."""
    with (paths.root / "stderr").open("ab") as err:
        return subprocess.Popen(
            paths.argv(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=child_env(),
            start_new_session=True,
        )


def answers(sock: Path) -> bool:
    """True if a supervisor answers /ping on ``sock``.

    A raw socket rather than httpx: httpcore's sync Unix-socket connect leaks the socket when
    the connection is refused, which ``filterwarnings = error`` turns into a failure.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(2.0)
        try:
            conn.connect(str(sock))
            conn.sendall(b"GET /ping HTTP/1.1\r\nHost: s\r\nConnection: close\r\n\r\n")
            reply = b""
            while chunk := conn.recv(4096):
                reply += chunk
        except OSError:
            return False
    return reply.startswith(b"HTTP/1.1 200") and reply.endswith(b'{"data":"pong"}')


def wait_answers(paths: SupervisorPaths, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not answers(paths.sock):
        if proc.poll() is not None:
            raise AssertionError(f"supervisor exited with {proc.returncode}:\n{paths.log_text()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"supervisor did not answer in {timeout} s:\n{paths.log_text()}")
        time.sleep(0.02)


@contextlib.contextmanager
def running_supervisor(
    paths: SupervisorPaths, timeout: float = 10.0, *, keep_children: bool = False
) -> Iterator[subprocess.Popen[bytes]]:
    """A supervisor that answers; on exit it is SIGKILLed, and so is every child it recorded
    as running unless ``keep_children`` (the test then ends them itself)."""
    proc = spawn_supervisor(paths)
    try:
        wait_answers(paths, proc, timeout)
        yield proc
    finally:
        kill_pid(proc.pid)
        proc.wait(timeout=10)
        if not keep_children:
            kill_recorded_children(paths)


def kill_pid(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def kill_recorded_children(paths: SupervisorPaths) -> None:
    """SIGKILL every process the state file lists as running, if it is still that process."""
    try:
        doc = json.loads(paths.state_file.read_text())
    except (OSError, ValueError):
        return
    for row in doc.get("processes", []):
        pid = row["state"]["pid"]
        if row["state"]["status"] != "running" or pid is None:
            continue
        stat = read_stat(pid)
        if stat is not None and stat.start_ticks == row.get("start_ticks"):
            kill_pid(pid)


def kill_supervisor_by_pid_file(paths: SupervisorPaths) -> None:
    """End a supervisor we did not spawn ourselves (e.g. one started by ensure_supervisor)."""
    try:
        pid = int(paths.pid_file.read_text())
    except (OSError, ValueError):
        return
    kill_pid(pid)
    wait_gone(pid, 10)


def kill_if_same(pid: int, start_ticks: int) -> None:
    """SIGKILL ``pid`` only if it is still the process that started at ``start_ticks``."""
    stat = read_stat(pid)
    if stat is not None and stat.start_ticks == start_ticks:
        kill_pid(pid)


def start_ticks(pid: int) -> int:
    stat = read_stat(pid)
    assert stat is not None, f"pid {pid} is gone"
    return stat.start_ticks


def proc_status(pid: int) -> str:
    return Path(f"/proc/{pid}/status").read_text()


def alive(pid: int) -> bool:
    stat = read_stat(pid)
    return stat is not None and not stat.zombie


def wait_gone(pid: int, timeout: float) -> bool:
    """Wait until ``pid`` has exited (a zombie counts as exited); False on timeout."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        readable, _, _ = select.select([pidfd], [], [], timeout)
        return bool(readable)
    finally:
        os.close(pidfd)


def sh_config(paths: SupervisorPaths, id: str, script: str, **kw: object) -> ProcessConfig:
    """A process running ``sh -c script`` whose files all live in the test's directory."""
    fields: dict[str, object] = {
        "id": id,
        "name": f"name-{id}",
        "command": "sh",
        "args": ["-c", script],
        "env": {},
        "cwd": str(paths.root),
        "stdout": str(paths.root / f"{id}.out"),
        "stderr": str(paths.root / f"{id}.err"),
        "pidfile": str(paths.root / f"{id}.pid"),
        "cid": None,
        "note": "",
    }
    fields.update(kw)
    return ProcessConfig.from_json(fields)


async def wait_status(
    client: SupervisorClient, id: str, status: Status, within: float = 5.0
) -> ProcessInfo:
    """Poll the supervisor until ``id`` reports ``status``."""
    last: ProcessInfo | None = None
    try:
        async with asyncio.timeout(within):
            while True:
                last = await client.info(id)
                if last is not None and last.state.status == status:
                    return last
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"{id} did not become {status} in {within} s: {last}") from None


async def wait_file_contains(path: Path, text: str, within: float = 5.0) -> str:
    """Poll a child's output file until it contains ``text``."""
    try:
        async with asyncio.timeout(within):
            while True:
                content = _read_or_empty(path)
                if text in content:
                    return content
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"{path} never contained {text!r}") from None


def _read_or_empty(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


def release_fifo(fifo: Path, timeout: float = 5.0) -> None:
    """Write a line to a FIFO a child is blocked reading, waiting (bounded) for it to open it."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            # Non-blocking: a plain open would wait forever if the child never opens its end.
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno != errno.ENXIO or time.monotonic() > deadline:
                raise
            time.sleep(0.02)
            continue
        try:
            os.write(fd, b"go\n")
        finally:
            os.close(fd)
        return
