"""Network namespaces for tests: made per test, every process in them ended by PID, deleted."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator

TIMEOUT = 30


def ns_run(ns: str, *cmd: str, input: str | None = None, check: bool = True,
           timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:  # fmt: skip
    """Run ``cmd`` inside ``ns``; raise with its stderr if it fails and ``check``."""
    done = subprocess.run(["ip", "netns", "exec", ns, *cmd], input=input, capture_output=True,
                          text=True, timeout=timeout, check=False)  # fmt: skip
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} in {ns}: rc={done.returncode}: {done.stderr}")
    return done


@contextlib.contextmanager
def netns(prefix: str) -> Iterator[str]:
    """A fresh namespace named ``<prefix><pid>`` with lo up; deleted afterwards."""
    name = f"{prefix}{os.getpid()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)  # a leftover
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=TIMEOUT)
    try:
        ns_run(name, "ip", "link", "set", "lo", "up")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False,
                       timeout=TIMEOUT)  # fmt: skip


def add_bridge(ns: str, name: str, cidr: str) -> None:
    ns_run(ns, "ip", "link", "add", name, "type", "bridge")
    ns_run(ns, "ip", "addr", "add", cidr, "dev", name)
    ns_run(ns, "ip", "link", "set", name, "up")


def end(proc: subprocess.Popen[bytes]) -> None:
    """Stop a process the test started, by its PID: SIGTERM, then SIGKILL."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
