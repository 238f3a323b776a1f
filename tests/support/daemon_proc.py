"""Start the real daemon as a subprocess for tests, and always stop it by PID."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

START_TIMEOUT = 60.0
_LISTEN_RE = re.compile(r"listening on (tcp|unix):(\S+)")


@dataclass
class DaemonProcess:
    proc: subprocess.Popen[bytes]
    workdir: Path
    log_path: Path
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


def write_config(workdir: Path, addresses: list[str], extra: str = "") -> Path:
    """A vmm.toml that keeps every path inside ``workdir``."""
    state = workdir / "state"
    addr = ", ".join(f'"{a}"' for a in addresses)
    text = f"""
address = [{addr}]
run_path = "{state}/vm"
log_level = "info"

[image]
path = "{state}/images"

[supervisor]
sock = "{state}/run/supervisor.sock"
pid_file = "{state}/run/supervisor.pid"
log_file = "{state}/run/supervisor.log"
state_file = "{state}/run/supervisor-state.json"
"""
    path = workdir / "vmm.toml"
    path.write_text(_merge_extra(text, extra))
    return path


def _merge_extra(base: str, extra: str) -> str:
    # Tests append whole tables; a table that already exists in the base is extended in place
    # by putting the extra keys right after its header.
    if not extra.strip():
        return base
    lines = base.splitlines()
    current: str | None = None
    blocks: dict[str | None, list[str]] = {}
    order: list[str | None] = []
    for line in extra.strip().splitlines():
        stripped = line.strip()
        if stripped.startswith("[") and not stripped.startswith("[["):
            current = stripped
        if current not in blocks:
            blocks[current] = []
            order.append(current)
        if stripped != current:
            blocks[current].append(line)
    result: list[str] = []
    top = blocks.pop(None, [])
    result.extend(top)
    for line in lines:
        result.append(line)
        if line.strip() in blocks:
            result.extend(blocks.pop(line.strip()))
    for header in order:
        if header in blocks:
            result.append(header or "")
            result.extend(blocks.pop(header))
    return "\n".join(result) + "\n"


def start_daemon(
    workdir: Path,
    addresses: list[str] | None = None,
    extra_config: str = "",
    env: dict[str, str] | None = None,
    timeout: float = START_TIMEOUT,
) -> DaemonProcess:
    """Start ``python -m vmm serve`` in ``workdir``; wait until every listener is up."""
    workdir.mkdir(parents=True, exist_ok=True)
    addresses = addresses or ["tcp:127.0.0.1:0"]
    config = write_config(workdir, addresses, extra_config)
    log_path = workdir / "daemon.log"
    log_file = log_path.open("ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "vmm", "-c", str(config), "serve"],
        cwd=workdir,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
    )
    log_file.close()
    daemon = DaemonProcess(proc=proc, workdir=workdir, log_path=log_path)
    try:
        _wait_ready(daemon, len(addresses), timeout)
    except BaseException:
        daemon.kill()
        raise
    return daemon


def _wait_ready(daemon: DaemonProcess, expected: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = daemon.log()
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
        daemon.kill()
