"""Start the real daemon as a subprocess for tests, and always stop it by PID."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

START_TIMEOUT = 60.0
LOG_TAIL_LINES = 200  # of the daemon's log, shown with a failed test
REPO_ROOT = Path(__file__).resolve().parents[2]
_LISTEN_RE = re.compile(r"listening on (tcp|unix):(\S+)")


@dataclass
class DaemonProcess:
    proc: subprocess.Popen[bytes]
    workdir: Path
    log_path: Path
    log_offset: int = 0  # where this process's lines start in a log shared with earlier runs
    tcp: list[str] = field(default_factory=list)  # "http://127.0.0.1:PORT"
    unix: list[Path] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return self.tcp[0]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def client(self, **kwargs: object) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=30.0, **kwargs)  # type: ignore[arg-type]

    def unix_client(self, **kwargs: object) -> httpx.Client:
        transport = httpx.HTTPTransport(uds=str(self.unix[0]))
        return httpx.Client(
            transport=transport, base_url="http://vmm", timeout=30.0, **kwargs  # type: ignore[arg-type]
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=15)
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=15)

    def stop(self) -> None:
        """Graceful stop (SIGTERM), then SIGKILL if it hangs."""
        self.kill(signal.SIGTERM)

    def destroy(self) -> None:
        """Kill the daemon, then every QEMU and the supervisor it started, each by PID.

        The log's tail goes to stdout, which pytest shows only for a failed test: the daemon's
        side of a failure (a traceback behind a 500) is otherwise lost with the temp dir.
        """
        self.kill()
        kill_vm_processes(self.workdir / "state")
        with contextlib.suppress(OSError):
            tail = self.log().splitlines()[-LOG_TAIL_LINES:]
            print(f"--- daemon log {self.log_path} (last {len(tail)} lines) ---", *tail, sep="\n")


def _pid_with(path: Path, marker: str) -> int | None:
    """The PID in ``path`` if that process still runs and its command line has ``marker``."""
    try:
        pid = int(path.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    return pid if marker.encode() in cmdline else None


def _kill_and_wait(pid: int, timeout: float = 15.0) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return  # a zombie: dead, waiting for its parent to reap it
        time.sleep(0.05)


def _pids_mentioning(path: Path) -> list[int]:
    """PIDs whose command line names ``path``: a test's unique temp dir, so nothing else."""
    needle = str(path).encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def kill_vm_processes(state: Path) -> None:
    """End what a test daemon left running: QEMUs first, then the supervisor, each by PID.

    PID files are read first; processes whose command line names this test's state directory
    are caught too, which covers a supervisor killed before it wrote its PID file.
    """
    for pid_file in sorted((state / "vm").glob("*/qemu.pid")):
        pid = _pid_with(pid_file, "qemu")
        if pid is not None:
            _kill_and_wait(pid)
    for pid in _pids_mentioning(state / "vm"):
        _kill_and_wait(pid)
    pid = _pid_with(state / "run" / "supervisor.pid", "vmm.supervisor")
    if pid is not None:
        _kill_and_wait(pid)
    for pid in _pids_mentioning(state / "run"):
        _kill_and_wait(pid)


def write_config(workdir: Path, addresses: list[str], extra: str = "") -> Path:
    """A vmm.toml that keeps every path inside ``workdir``; ``extra`` TOML is deep-merged in."""
    state = workdir / "state"
    base: dict[str, Any] = {
        "address": addresses,
        "run_path": f"{state}/vm",
        "log_level": "info",
        "image": {"path": f"{state}/images"},
        "supervisor": {
            "sock": f"{state}/run/supervisor.sock",
            "pid_file": f"{state}/run/supervisor.pid",
            "log_file": f"{state}/run/supervisor.log",
            "state_file": f"{state}/run/supervisor-state.json",
        },
    }
    path = workdir / "vmm.toml"
    path.write_text(dump_toml(_deep_merge(base, tomllib.loads(extra))))
    return path


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {value!r} as TOML")


def dump_toml(table: dict[str, Any], prefix: str = "") -> str:
    """Just enough TOML writing for test configs: scalars, arrays, inline and nested tables."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in table.items() if not isinstance(v, dict)]
    for key, value in table.items():
        if isinstance(value, dict):
            name = f"{prefix}{key}"
            lines.append(f"\n[{name}]")
            lines.append(dump_toml(value, f"{name}."))
    return "\n".join(line for line in lines if line) + "\n"


def checkout_env() -> dict[str, str]:
    """The environment for a ``python -m vmm...`` child: the checkout under test first on its
    path, since an editable install may point at another checkout."""
    path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path}


def start_daemon(
    workdir: Path,
    addresses: list[str] | None = None,
    extra_config: str = "",
    env: dict[str, str] | None = None,
    timeout: float = START_TIMEOUT,
    wrap: Sequence[str] = (),
) -> DaemonProcess:
    """Start ``python -m vmm serve`` in ``workdir``; wait until every listener is up.

    ``wrap`` is a command that execs its arguments (``unshare -m ...``): the daemon keeps its PID.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    addresses = addresses or ["tcp:127.0.0.1:0"]
    config = write_config(workdir, addresses, extra_config)
    log_path = workdir / "daemon.log"
    log_file = log_path.open("ab")
    offset = log_file.tell()
    proc = subprocess.Popen(
        [*wrap, sys.executable, "-m", "vmm", "-c", str(config), "serve"],
        cwd=workdir,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        env={**checkout_env(), **(env or {})},
    )
    log_file.close()
    daemon = DaemonProcess(proc=proc, workdir=workdir, log_path=log_path, log_offset=offset)
    try:
        _wait_ready(daemon, len(addresses), timeout)
    except BaseException:
        daemon.destroy()
        raise
    return daemon


def _wait_ready(daemon: DaemonProcess, expected: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with daemon.log_path.open("rb") as fp:
            fp.seek(daemon.log_offset)
            text = fp.read().decode(errors="replace")
        if daemon.proc.poll() is not None:
            raise RuntimeError(f"daemon exited with {daemon.proc.returncode}:\n{text}")
        found = _LISTEN_RE.findall(text)
        if len(found) >= expected and "Application startup complete" in text:
            for kind, where in found[:expected]:
                if kind == "tcp":
                    host, _, port = where.rpartition(":")
                    daemon.tcp.append(f"http://{host}:{port}")
                else:
                    daemon.unix.append(Path(where))
            return
        time.sleep(0.05)
    raise TimeoutError(f"daemon not ready after {timeout}s:\n{daemon.log()}")


@contextlib.contextmanager
def running_daemon(workdir: Path, **kwargs: object) -> Iterator[DaemonProcess]:
    daemon = start_daemon(workdir, **kwargs)  # type: ignore[arg-type]
    try:
        yield daemon
    finally:
        daemon.destroy()
