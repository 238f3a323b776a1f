"""Host capacity: vCPUs and memory as totals over every VM the daemon holds.

Rule: a VM reserves its vCPUs, memory and CID from CreateVm until its removal has finished,
whatever its status. A stopped VM may be started at any moment (by an operator, by
reconciliation or by auto-restart), and a start that fails for lack of capacity at 3 a.m. is
worse than a create that fails at once. So:

- CreateVm checks the new VM against what all other VMs reserve;
- ResizeVm/UpdateVm check the new size against all other VMs;
- StartVm checks the VM against all others too. That only fails when the host is over-committed,
  which happens when an operator lowers the limits or drops work directories in by hand
  (ReloadVms loads them whatever their size, since disk is the truth).

GetMeta's used/free figures (``usage``) count by the same rule, so "free" is exactly what the
next CreateVm may take. The VM count cap is the CID pool (``cid_pool.py``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from vmm.core.config import Config
from vmm.core.exceptions import ResourceExhausted
from vmm.model.vm import Vm


@dataclass(frozen=True)
class ResourceUsage:
    vms: int
    vcpu: int
    memory_mb: int


def usage(vms: Iterable[Vm]) -> ResourceUsage:
    count = vcpu = memory = 0
    for vm in vms:
        count += 1
        vcpu += vm.manifest.vcpu
        memory += vm.manifest.memory
    return ResourceUsage(vms=count, vcpu=vcpu, memory_mb=memory)


def check_fits(
    config: Config, vms: Iterable[Vm], *, vcpu: int, memory_mb: int, exclude: str | None = None
) -> None:
    """Raise ResourceExhausted unless ``vcpu``/``memory_mb`` fit beside every VM but ``exclude``."""
    used = usage(vm for vm in vms if vm.id != exclude)
    cvm = config.cvm
    vcpu_left = cvm.max_allocable_vcpu - used.vcpu
    if vcpu > vcpu_left:
        raise ResourceExhausted(
            f"not enough vCPUs: {vcpu} requested, {max(vcpu_left, 0)} of "
            f"{cvm.max_allocable_vcpu} left (cvm.max_allocable_vcpu)"
        )
    memory_left = cvm.max_allocable_memory_in_mb - used.memory_mb
    if memory_mb > memory_left:
        raise ResourceExhausted(
            f"not enough memory: {memory_mb} MB requested, {max(memory_left, 0)} of "
            f"{cvm.max_allocable_memory_in_mb} MB left (cvm.max_allocable_memory_in_mb)"
        )
