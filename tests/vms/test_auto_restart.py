"""Auto-restart: a VM that should run is restarted with backoff, gives up once, resets on health."""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import httpx
import pytest

from tests.support.idle_image import IDLE_IMAGE
from tests.support.libvirtd import private_libvirtd
from tests.support.short_dirs import short_dir
from tests.support.vm_ops import (
    call,
    create,
    error_of,
    events,
    free_port,
    idle_daemon,
    pid_gone,
    qemu_pid_of,
    qemu_pids,
    rpc,
    status_of,
    vm_info,
    wait_for,
)
from vmm.vms.auto_restart import backoff_delay

pytestmark = pytest.mark.qemu


def restart_config(max_retries: int = 3, reset_window: int = 600) -> str:
    return (f"[cvm.auto_restart]\nenabled = true\ninterval = 1\nmax_retries = {max_retries}\n"
            f"initial_backoff = 1\nmax_backoff = 2\nreset_window = {reset_window}\n")


def kill_qemu(vm_dir: Path) -> int:
    pid = qemu_pid_of(vm_dir)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    wait_for(f"QEMU {pid} to die", lambda: pid_gone(pid))
    return pid


def restarted_after(vm_dir: Path, old_pid: int) -> int | None:
    pid = qemu_pid_of(vm_dir)
    return pid if pid is not None and pid != old_pid else None


def named(client: httpx.Client, vm_id: str, event: str) -> list[str]:
    return [body for name, body in events(vm_info(client, vm_id)) if name == event]


def test_backoff_doubles_up_to_the_cap() -> None:
    """Delays after attempts 1, 2, 3 … are initial·2ⁿ capped at max_backoff."""
    assert [backoff_delay(n, 5, 300) for n in range(1, 8)] == [10, 20, 40, 80, 160, 300, 300]
    assert backoff_delay(10_000, 1, 60) == 60


def test_killed_qemu_restarts_then_gives_up_once() -> None:
    """SIGKILLed QEMU → exited → restarted; with a broken kernel it gives up after max_retries."""
    with short_dir("vmma") as workdir, idle_daemon(workdir, extra=restart_config()) as daemon, \
            daemon.client() as client:
        vm_id = create(client)
        vm_dir = workdir / "state" / "vm" / vm_id
        wait_for("QEMU", lambda: qemu_pid_of(vm_dir))

        first = kill_qemu(vm_dir)
        wait_for("status exited", lambda: status_of(client, vm_id) == "exited")
        second = wait_for("the automatic restart", lambda: restarted_after(vm_dir, first))
        wait_for("status running", lambda: status_of(client, vm_id) == "running")
        # The new QEMU's pid can show before the restart is recorded: wait for the event.
        wait_for("the restart event", lambda: ("vmm.auto_restart", "attempt 1 of 3: restarted")
                 in events(vm_info(client, vm_id)))
        assert ("vmm.exited", "QEMU exited (signal 9)") in events(vm_info(client, vm_id))

        # From now on QEMU cannot start: it exits at once on a kernel it cannot load.
        kernel = workdir / "state" / "images" / IDLE_IMAGE / "idle.bin"
        good_kernel = kernel.read_bytes()
        kernel.write_bytes(b"\0" * 64)
        kill_qemu(vm_dir)
        assert second
        wait_for("the give-up event",
                 lambda: named(client, vm_id, "vmm.auto_restart.exhausted"), timeout=90)
        attempts = named(client, vm_id, "vmm.auto_restart")
        assert named(client, vm_id, "vmm.auto_restart.exhausted") == [
            "Automatic restart stopped after 3 failed attempts"]
        assert attempts[-1] == "attempt 3 of 3: restarted"
        assert status_of(client, vm_id) == "exited"
        # Given up means given up: a few more checks try nothing and say nothing again.
        time.sleep(3.5)
        assert named(client, vm_id, "vmm.auto_restart.exhausted") == [
            "Automatic restart stopped after 3 failed attempts"]
        assert named(client, vm_id, "vmm.auto_restart") == attempts

        # A manual StartVm hands it back: it runs, and a later crash gets a fresh budget.
        kernel.write_bytes(good_kernel)
        rpc(client, "StartVm", {"id": vm_id})
        wait_for("QEMU", lambda: qemu_pid_of(vm_dir))
        third = kill_qemu(vm_dir)
        wait_for("another automatic restart", lambda: restarted_after(vm_dir, third))
        wait_for("a fresh budget's first attempt",
                 lambda: named(client, vm_id, "vmm.auto_restart")[-1] == "attempt 1 of 3: restarted")


def test_killed_qemu_restarts_under_libvirt() -> None:
    """On the libvirt backend too: a SIGKILLed QEMU is seen exited and restarted with backoff."""
    with private_libvirtd() as libvirtd, short_dir("vmml") as workdir, \
            idle_daemon(workdir, cvm='backend = "libvirt"',
                        extra=restart_config() + f'[libvirt]\nuri = "{libvirtd.uri}"\n') as daemon, \
            daemon.client() as client:
        state = workdir / "state"
        vm_id = create(client)
        first = wait_for("QEMU", lambda: qemu_pids(state))[0]
        os.kill(first, signal.SIGKILL)
        wait_for(f"QEMU {first} to die", lambda: pid_gone(first))
        wait_for("status exited", lambda: status_of(client, vm_id) == "exited")
        wait_for("the automatic restart", lambda: [p for p in qemu_pids(state) if p != first])
        wait_for("the restart event", lambda: ("vmm.auto_restart", "attempt 1 of 3: restarted")
                 in events(vm_info(client, vm_id)))
        assert status_of(client, vm_id) == "running"
        assert "vmm.exited" in [name for name, _ in events(vm_info(client, vm_id))]


def test_refused_start_counts_as_a_failed_attempt() -> None:
    """StartVm refused (host port taken) → the VM stays exited, retried, then given up."""
    port = free_port()
    with short_dir("vmma") as workdir, \
            idle_daemon(workdir, extra=restart_config(max_retries=2)) as daemon, \
            daemon.client() as client, socket.socket() as squatter:
        vm_id = create(client, stopped=True,
                       ports=[{"protocol": "tcp", "host_port": port, "vm_port": 80}])
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        assert "in use by another process" in error_of(call(client, "StartVm", {"id": vm_id}), 409)
        assert status_of(client, vm_id) == "exited"  # the start was wanted; it just failed
        wait_for("the give-up event",
                 lambda: named(client, vm_id, "vmm.auto_restart.exhausted"), timeout=60)
        attempts = named(client, vm_id, "vmm.auto_restart")
        assert len(attempts) == 2
        assert attempts[0].startswith("attempt 1 of 2 failed: host port tcp")
        assert named(client, vm_id, "vmm.auto_restart.exhausted") == [
            "Automatic restart stopped after 2 failed attempts"]
        squatter.close()
        rpc(client, "StartVm", {"id": vm_id})
        assert status_of(client, vm_id) == "running"


def test_running_for_reset_window_resets_the_counter() -> None:
    """After reset_window of health, the next crash starts again from attempt 1."""
    with short_dir("vmma") as workdir, \
            idle_daemon(workdir, extra=restart_config(reset_window=2)) as daemon, \
            daemon.client() as client:
        vm_id = create(client)
        vm_dir = workdir / "state" / "vm" / vm_id
        wait_for("QEMU", lambda: qemu_pid_of(vm_dir))
        first = kill_qemu(vm_dir)
        wait_for("the automatic restart", lambda: restarted_after(vm_dir, first))
        wait_for("the counter reset",
                 lambda: "auto-restart counters reset" in daemon.log(), timeout=30)
        second = kill_qemu(vm_dir)
        wait_for("the second restart", lambda: restarted_after(vm_dir, second))
        wait_for("its event", lambda: len(named(client, vm_id, "vmm.auto_restart")) == 2)
        assert named(client, vm_id, "vmm.auto_restart") == [
            "attempt 1 of 3: restarted", "attempt 1 of 3: restarted"]
