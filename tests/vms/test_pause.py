"""PauseVm/ResumeVm on real QEMU (TCG), once per backend: the guest's clock stops, the VM keeps
its resources, a paused VM survives a daemon kill -9, and Shutdown/Stop/Remove still work."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support import vm_ops
from tests.support.daemon_proc import DaemonProcess, start_daemon
from tests.support.guest_image import ensure_guest_image
from tests.support.libvirtd import Libvirtd, private_libvirtd
from tests.support.short_dirs import short_dir
from tests.support.vm_ops import call, error_of, rpc, status_of, vm_info
from tests.vms.test_manager import BACKENDS, backend_config, create, qemu_config, qemu_pids

pytestmark = pytest.mark.qemu

BOOT_TIMEOUT = 180.0
PAUSED_FOR = 12.0  # wall seconds the guest stays paused (the clock check's margin is 4 s)


@pytest.fixture(scope="module")
def image_dir() -> Path:
    return ensure_guest_image()


@pytest.fixture(scope="module")
def libvirtd() -> Iterator[Libvirtd]:
    with private_libvirtd() as daemon:
        yield daemon


@pytest.fixture
def workdir() -> Iterator[Path]:
    with short_dir("vmps") as path:
        yield path


def guest_uptime(client: httpx.Client, vm_id: str) -> int | None:
    """The guest's own seconds since boot (its clock), through the agent; None if no answer."""
    response = client.post("/guest/SysInfo?json", json={"id": vm_id}, timeout=15)
    if response.status_code != 200:
        return None
    return int(response.json()["uptime"])


def pause_when_started(client: httpx.Client, vm_id: str) -> None:
    """Pause a VM just started: until its QEMU opens its QMP socket PauseVm answers 503."""
    vm_ops.wait_for("PauseVm to be taken",
                    lambda: call(client, "PauseVm", {"id": vm_id}).status_code == 200, 30, 0.2)
    assert status_of(client, vm_id) == "paused"


def used_vms(client: httpx.Client) -> int:
    return int(rpc(client, "GetMeta")["resources"].get("used_cvm_number", 0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_pause_resume_across_daemon_kill(backend: str, request: pytest.FixtureRequest,
                                         image_dir: Path, workdir: Path) -> None:
    """A paused guest's clock stops, it stays paused and holds its resources across a daemon
    kill -9, resumes with its agent answering, and Shutdown/Stop/Remove of a paused VM work."""
    cvm, extra = backend_config(request, backend)
    config = qemu_config(image_dir, cvm, extra)
    first = start_daemon(workdir, extra_config=config)
    second: DaemonProcess | None = None
    try:
        with first.client() as client:
            vm_id = create(client, image_dir.name)
            vm_ops.wait_for("boot progress 'done'",
                            lambda: vm_info(client, vm_id)["boot_progress"] == "done",
                            BOOT_TIMEOUT)
            before = vm_ops.wait_for("the agent", lambda: guest_uptime(client, vm_id), 60)
            wall_before = time.monotonic()
            pids = qemu_pids(workdir)
            assert len(pids) == 1

            assert rpc(client, "PauseVm", {"id": vm_id}) is None
            paused_at = time.monotonic()
            assert vm_info(client, vm_id)["status"] == "paused"
            assert rpc(client, "PauseVm", {"id": vm_id}) is None  # pausing twice is no error
            assert used_vms(client) == 1  # it keeps its reservation

        first.kill()  # SIGKILL: the new daemon must learn "paused" from the backend
        assert qemu_pids(workdir) == pids
        second = start_daemon(workdir, extra_config=config)
        with second.client() as client:
            assert vm_info(client, vm_id)["status"] == "paused"
            assert qemu_pids(workdir) == pids  # adopted, not restarted
            # Auto-restart (on by default) must not take a paused VM for a dead one.
            time.sleep(max(PAUSED_FOR - (time.monotonic() - paused_at), 0))
            assert vm_info(client, vm_id)["status"] == "paused"
            assert qemu_pids(workdir) == pids

            assert rpc(client, "ResumeVm", {"id": vm_id}) is None
            paused_for = time.monotonic() - paused_at
            assert vm_info(client, vm_id)["status"] == "running"
            after = vm_ops.wait_for("the agent after resume",
                                    lambda: guest_uptime(client, vm_id), 60)
            wall = time.monotonic() - wall_before
            # The guest's clock did not run while paused: it advanced by at most the time it
            # was not paused (plus rounding of the whole-second uptimes and the calls).
            assert after - before <= wall - paused_for + 4, (before, after, wall, paused_for)
            # ... and runs again now.
            vm_ops.wait_for("the guest clock to tick again",
                            lambda: (guest_uptime(client, vm_id) or 0) >= after + 2, 60)
            events = [e["event"] for e in vm_info(client, vm_id)["events"]]
            assert "vmm.paused" in events or "vmm.adopted" in events
            assert "vmm.resumed" in events

            # Shutdown of a paused VM resumes it so the guest can power off gracefully.
            rpc(client, "PauseVm", {"id": vm_id})
            rpc(client, "ShutdownVm", {"id": vm_id})
            vm_ops.wait_for("a graceful shutdown", lambda: status_of(client, vm_id) == "stopped",
                            120)
            assert qemu_pids(workdir) == []
            # Pausing a stopped VM is a conflict, not a crash.
            assert "not running" in error_of(call(client, "PauseVm", {"id": vm_id}), 409)
            assert "not running" in error_of(call(client, "ResumeVm", {"id": vm_id}), 409)

            # Stop of a paused VM hard-stops it; Remove of a paused VM removes it.
            rpc(client, "StartVm", {"id": vm_id})
            pause_when_started(client, vm_id)
            assert status_of(client, vm_id) == "paused"
            rpc(client, "StopVm", {"id": vm_id})
            assert status_of(client, vm_id) == "stopped"
            assert qemu_pids(workdir) == []
            rpc(client, "StartVm", {"id": vm_id})
            pause_when_started(client, vm_id)
            rpc(client, "RemoveVm", {"id": vm_id})
            vm_ops.wait_for("the VM to disappear", lambda: status_of(client, vm_id) == "gone", 60)
            assert qemu_pids(workdir) == []
    finally:
        if second is not None:
            second.destroy()
        first.destroy()
