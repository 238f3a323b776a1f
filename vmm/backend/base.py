"""The seam between the lifecycle layer and whatever runs QEMU.

The Manager decides *what* should happen to a VM (start it, power it off, forget it) and keeps
the registry; a backend decides *how*: the QEMU backend hands an argv to the supervisor process
and talks QMP, the libvirt backend defines a domain and asks libvirtd. Both are driven by the same
resolved description of the VM (``LaunchSpec``) and report what runs in the same shape
(``Runtime``), so reconciliation, limits, auto-restart and Status do not know which one is active.

A backend owns its VMs across daemon restarts: ``runtimes`` must report every VM it still runs
(by VM id) so the daemon can adopt them after a restart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

from vmm.backend.qemu.argv import LaunchSpec

RuntimeStatus = Literal["running", "stopped", "exited", "error"]


@dataclass(frozen=True)
class Runtime:
    """What a backend knows of one VM's QEMU: enough for Status, adoption and reconciliation."""

    status: RuntimeStatus
    pid: int | None = None
    started_at: float | None = None  # wall-clock seconds, for uptime
    exit_code: int | None = None
    signal: int | None = None
    error: str = ""
    cid: int | None = None  # the vsock CID it runs with; kept across daemon restarts
    is_vm: bool = True  # False for other processes a backend may own (e.g. live_for helpers)

    @property
    def running(self) -> bool:
        return self.status == "running"


@dataclass(frozen=True)
class BackendInfo:
    """What GetMeta says of the active backend."""

    name: str
    version: str
    features: tuple[str, ...]  # what this backend can run on this host
    unsupported: tuple[str, ...]  # features it refuses here, each with the reason


class VmBackend(Protocol):
    """Runs VMs. Every method is keyed by VM id; a backend may keep what it needs per id."""

    @property
    def info(self) -> BackendInfo: ...

    def check_supported(self, spec: LaunchSpec) -> None:
        """Raise ``Unsupported`` naming the feature and the backend if ``spec`` cannot run here."""

    async def launch(self, spec: LaunchSpec) -> Runtime:
        """Start the VM's QEMU; return once it is running (or raise)."""

    async def runtime(self, vm_id: str) -> Runtime | None:
        """The VM's current state, or None if the backend has no record of it."""

    async def runtimes(self) -> dict[str, Runtime]:
        """Every VM (and helper process) the backend has a record of, by id."""

    async def request_power_off(self, vm_id: str) -> None:
        """Press the ACPI power button; raise ``Unavailable`` if it cannot be pressed."""

    async def kill(self, vm_id: str) -> None:
        """Hard-stop the VM; its record stays (stopped) until ``forget``."""

    async def forget(self, vm_id: str) -> None:
        """Drop the backend's record of a stopped VM (supervisor entry, libvirt domain)."""

    async def close(self) -> None:
        """Release connections; running VMs keep running."""
