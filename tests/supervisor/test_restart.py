"""A killed supervisor is restarted by the daemon, which re-adopts the VMs it ran.

Every test kills the real supervisor with SIGKILL by the pid in its pid file, as a crash or an
OOM kill would, and talks to the real daemon over HTTP while it recovers.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from tests.support.daemon_proc import DaemonProcess
from tests.support.short_dirs import short_dir
from tests.support.supervisor_proc import alive, start_ticks, wait_gone
from tests.support.vm_ops import (
    call,
    create,
    idle_daemon,
    pid_gone,
    qemu_pid_of,
    rpc,
    status_of,
    wait_for,
)

RECOVERY_TIMEOUT = 30.0
# Restart attempts back off after failures; once the cause is gone, the next one must succeed.
RECOVERY_AFTER_FAILURES_TIMEOUT = 60.0


def supervisor_pid(state: Path) -> int | None:
    """The supervisor's pid from its pid file, if that process runs and is a supervisor."""
    try:
        pid = int((state / "run" / "supervisor.pid").read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    return pid if b"vmm.supervisor" in cmdline and alive(pid) else None


def kill_supervisor(state: Path) -> int:
    """SIGKILL the daemon's supervisor by its recorded pid; return that pid once it is dead."""
    pid = supervisor_pid(state)
    assert pid is not None, "no supervisor runs"
    os.kill(pid, signal.SIGKILL)
    assert wait_gone(pid, 10), f"supervisor {pid} survived SIGKILL"
    return pid


def until_ok(client: httpx.Client, method: str, body: dict[str, str] | None = None,
             timeout: float = RECOVERY_TIMEOUT) -> httpx.Response:
    """Repeat a call until it answers 200; any answer but 200 or 503 fails the test."""
    deadline = time.monotonic() + timeout
    while True:
        response = call(client, method, body)
        assert response.status_code in (200, 503), f"{method}: {response.status_code} " \
            f"{response.text}"
        if response.status_code == 200:
            return response
        assert time.monotonic() < deadline, f"{method} still 503 after {timeout}s: " \
            f"{response.text}"
        time.sleep(0.1)


def sv_processes(client: httpx.Client) -> dict[str, dict[str, object]]:
    return {p["id"]: p for p in rpc(client, "SvList")["processes"]}


def running_vm(client: httpx.Client, state: Path) -> tuple[str, int, int]:
    """Create an idle VM and wait until it runs; its id, QEMU pid and that pid's start time."""
    vm_id = create(client)
    wait_for("QEMU to run", lambda: status_of(client, vm_id) == "running")
    pid = qemu_pid_of(state / "vm" / vm_id)
    assert pid is not None
    return vm_id, pid, start_ticks(pid)


def restarts_logged(daemon: DaemonProcess) -> int:
    return daemon.log().count("supervisor restarted")


def test_killed_supervisor_is_restarted_and_sv_list_recovers() -> None:
    """After kill -9 of the supervisor, SvList answers 200 again (only 200/503 meanwhile)."""
    with short_dir("vmmsr") as workdir, idle_daemon(workdir) as daemon, \
            daemon.client() as client:
        state = workdir / "state"
        old = kill_supervisor(state)
        until_ok(client, "SvList")
        new = wait_for("the new supervisor's pid file", lambda: supervisor_pid(state), 10)
        assert new != old
        assert restarts_logged(daemon) == 1, daemon.log()
        # Calls after the restart go straight to the new supervisor.
        assert rpc(client, "SvList") == {"processes": []}


def test_daemon_restarts_a_killed_supervisor_unasked() -> None:
    """With no call to trigger it, the daemon's watcher notices the dead supervisor and restarts it."""
    with short_dir("vmmsr") as workdir, idle_daemon(workdir) as daemon:
        state = workdir / "state"
        old = kill_supervisor(state)
        new = wait_for("a new supervisor", lambda: supervisor_pid(state), RECOVERY_TIMEOUT)
        assert new != old
        wait_for("the restart to be logged", lambda: restarts_logged(daemon) == 1, 10)


@pytest.mark.qemu
def test_running_vm_is_adopted_by_the_restarted_supervisor_and_stops() -> None:
    """A VM's QEMU outlives the killed supervisor; the new one adopts it and StopVm stops it."""
    with short_dir("vmmsr") as workdir, idle_daemon(workdir) as daemon, \
            daemon.client() as client:
        state = workdir / "state"
        vm_id, qemu, ticks = running_vm(client, state)
        kill_supervisor(state)
        assert alive(qemu) and start_ticks(qemu) == ticks

        until_ok(client, "SvList")
        adopted = sv_processes(client)[vm_id]
        assert (adopted["status"], adopted["pid"]) == ("running", qemu)
        assert start_ticks(qemu) == ticks  # the same process, not a new boot
        assert status_of(client, vm_id) == "running"

        rpc(client, "StopVm", {"id": vm_id})
        wait_for("the adopted QEMU to exit", lambda: pid_gone(qemu), 20)
        assert status_of(client, vm_id) == "stopped"
        assert sv_processes(client)[vm_id]["status"] == "stopped"
        desired = json.loads((state / "vm" / vm_id / "vm-state.json").read_text())
        assert desired["started"] is False


def refused_503(client: httpx.Client, method: str, vm_id: str) -> str:
    response = call(client, method, {"id": vm_id})
    assert response.status_code == 503, f"{method}: {response.status_code} {response.text}"
    assert response.json()["code"] == "UNAVAILABLE"
    message: str = response.json()["error"]
    return message


@pytest.mark.qemu
def test_calls_while_supervisor_cannot_restart_are_503_and_change_nothing() -> None:
    """Stop/Start/RemoveVm with a dead supervisor that cannot restart: 503s, nothing written."""
    with short_dir("vmmsr") as workdir, idle_daemon(workdir) as daemon, \
            daemon.client() as client:
        state = workdir / "state"
        vm_id, qemu, ticks = running_vm(client, state)
        idle_id = create(client, stopped=True)
        before = {i: sorted((p.name, p.read_bytes()) for p in (state / "vm" / i).glob("vm-*"))
                  for i in (vm_id, idle_id)}
        # A supervisor refuses to start on a state file it cannot read (it would orphan every
        # VM listed there), so every restart fails until the file is put back.
        table_file = state / "run" / "supervisor-state.json"
        table = table_file.read_bytes()
        table_file.write_text("{not json")
        kill_supervisor(state)

        # The cause, from the failed supervisor's own log.
        assert "cannot read state file" in refused_503(client, "StopVm", vm_id)
        assert "supervisor" in refused_503(client, "StartVm", idle_id)
        assert "supervisor" in refused_503(client, "RemoveVm", idle_id)
        listed = call(client, "SvList")
        assert listed.status_code == 503, listed.text
        after = {i: sorted((p.name, p.read_bytes()) for p in (state / "vm" / i).glob("vm-*"))
                 for i in (vm_id, idle_id)}
        assert after == before  # vm-state.json (and no `.removing` mark) as they were
        assert not (state / "vm" / idle_id / ".removing").exists()
        assert alive(qemu) and start_ticks(qemu) == ticks
        assert status_of(client, vm_id) == "running"
        assert status_of(client, idle_id) == "stopped"
        assert "restarting the supervisor failed" in daemon.log()

        table_file.write_bytes(table)
        until_ok(client, "SvList", timeout=RECOVERY_AFTER_FAILURES_TIMEOUT)
        assert sv_processes(client)[vm_id]["pid"] == qemu
        rpc(client, "StopVm", {"id": vm_id})
        wait_for("the adopted QEMU to exit", lambda: pid_gone(qemu), 20)
        desired = json.loads((state / "vm" / vm_id / "vm-state.json").read_text())
        assert desired["started"] is False
