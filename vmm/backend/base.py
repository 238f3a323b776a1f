"""The seam between the lifecycle layer and whatever runs QEMU.

The Manager decides *what* should happen to a VM (start it, power it off, forget it) and keeps
the registry; a backend decides *how*: the QEMU backend hands an argv to the supervisor process
and talks QMP, the libvirt backend defines a domain and asks libvirtd. Both are driven by the same
resolved description of the VM (``LaunchSpec``) and report what runs in the same shape
(``Runtime``), so reconciliation, limits, auto-restart and Status do not know which one is active.

A backend owns its VMs across daemon restarts: ``runtimes`` reports every VM it still has (by VM
id), so the daemon adopts them after a restart. Whether a VM is paused is the backend's to say
(``Runtime.paused``, read from QEMU or libvirtd), never the daemon's files: a paused QEMU is
paused whatever the daemon wrote, and one that died is no longer paused. Backends are chosen by
``[cvm] backend`` in one place, ``vmm.backend.select``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from vmm.core.config import NetworkingConfig
from vmm.host.capabilities import HostCapabilities
from vmm.model.images import Image
from vmm.model.manifest import Manifest
from vmm.model.runtime import Runtime
from vmm.net.nics import ResolvedNic, resolve_networks


def _node_zero(slot: str) -> int:
    return 0


def _cpus_of_node_zero(node: int) -> str:
    return "0"


@dataclass(frozen=True)
class LaunchSpec:
    """Everything a backend needs to run one VM, resolved by the lifecycle layer at each start.

    Pure data (the callables answer host NUMA questions), so the QEMU argv and the libvirt
    domain XML are pure functions of it and pinned by golden tests.
    """

    manifest: Manifest
    image: Image
    workdir: Path
    cid: int
    host: HostCapabilities
    compose_hash: str
    numa_node_of: Callable[[str], int] = _node_zero
    node_cpulist: Callable[[int], str] = _cpus_of_node_zero
    gpu_slots: tuple[str, ...] = ()
    bridge_slots: tuple[str, ...] = ()
    sev_cbitpos: int = 51
    sev_reduced_phys_bits: int = 1
    # The NICs as vmm.net resolved them at this start (modes, MACs, bridges, each NIC's port
    # mappings). None only in specs built by hand (tests): ``resolved_nics`` resolves them then.
    nics: tuple[ResolvedNic, ...] | None = None

    def resolved_nics(self, networking: NetworkingConfig) -> tuple[ResolvedNic, ...]:
        if self.nics is not None:
            return self.nics
        return resolve_networks(self.manifest, networking)


@dataclass(frozen=True)
class BackendInfo:
    """What GetMeta says of the active backend."""

    name: str
    version: str
    features: tuple[str, ...]  # what this backend can run on this host
    unsupported: tuple[str, ...]  # what it refuses here, each "feature: reason"


class VmBackend(Protocol):
    """Runs VMs. Every method is keyed by VM id; a backend keeps what it needs per id."""

    @property
    def info(self) -> BackendInfo: ...

    def check_supported(self, spec: LaunchSpec) -> None:
        """Raise ``Unsupported`` naming the feature and the backend if ``spec`` cannot run here."""

    async def ready(self) -> None:
        """Raise ``Unavailable`` if the backend cannot take a request now (nothing is changed)."""

    async def prepare_disk(self, spec: LaunchSpec) -> None:
        """Create the VM's disk (an overlay over the image's) if it does not exist yet."""

    async def grow_disk(self, disk: Path, size_gb: int) -> None:
        """Grow a stopped VM's disk to ``size_gb`` GiB."""

    async def launch(self, spec: LaunchSpec) -> Runtime | None:
        """Start the VM's QEMU; return its state (None if it cannot be read right after)."""

    async def runtime(self, vm_id: str) -> Runtime | None:
        """The VM's current state, or None if the backend has no record of it."""

    async def runtimes(self) -> dict[str, Runtime]:
        """Every VM (and helper process) the backend has a record of, by id."""

    async def request_power_off(self, vm_id: str) -> None:
        """Press the ACPI power button; raise ``Unavailable`` if it cannot be pressed."""

    async def pause(self, vm_id: str) -> None:
        """Stop the running VM's vCPUs (it keeps its memory and devices); Conflict if not running."""

    async def resume(self, vm_id: str) -> None:
        """Let a paused VM's vCPUs run again; Conflict if it is not running."""

    async def kill(self, vm_id: str) -> None:
        """Hard-stop the VM; its record stays (stopped) until ``forget``."""

    async def forget(self, vm_id: str) -> None:
        """Drop the backend's record of a VM that no longer runs (supervisor entry, domain)."""

    async def close(self) -> None:
        """Release connections; running VMs keep running."""
