"""What a VM's work directory needs before each boot, whichever backend runs it.

Leftover sockets of the previous boot go, the host ports are checked, the disk is made, the
guest's ``.sys-config.json`` is written, the logs are rotated and a boot marker starts the
serial log, so an operator reading ``serial.log`` sees where each boot begins.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json

from vmm.backend.base import LaunchSpec, VmBackend
from vmm.core.config import Config
from vmm.host.capabilities import HostCapabilities
from vmm.model.images import Image
from vmm.model.vm import Vm
from vmm.net.ports import check_host_ports_free
from vmm.vms import log_rotation


async def prepare(vm: Vm, spec: LaunchSpec, backend: VmBackend, config: Config,
                  host: HostCapabilities) -> None:
    wd = vm.workdir
    for stale in (wd.serial_pty, wd.qmp_socket, wd.agent_socket, wd.host_api_socket):
        stale.unlink(missing_ok=True)
    check_host_ports_free(vm.manifest.port_map)
    await backend.prepare_disk(spec)
    await asyncio.to_thread(wd.write_json, wd.sys_config, sys_config(vm, spec.image, config, host))
    await log_rotation.rotate_for_boot(wd, config.cvm.log)
    stamp = dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()
    with wd.serial_log.open("ab") as serial:
        serial.write(f"\n===== boot @ {stamp} =====\n".encode())


def sys_config(vm: Vm, image: Image, config: Config, host: HostCapabilities) -> dict[str, object]:
    """The guest's view of its configuration (dstack's ``.sys-config.json``)."""
    cvm = config.cvm
    vm_config = {
        "os_image_hash": "",
        "cpu_count": vm.manifest.vcpu,
        "memory_size": vm.manifest.memory * 1024 * 1024,
        "qemu_version": host.qemu_version,
        "pci_hole64_size": cvm.qemu_pci_hole64_size,
        "hugepages": vm.manifest.hugepages,
        "num_gpus": len(vm.manifest.gpus.gpus) if vm.manifest.gpus else 0,
        "num_nvswitches": 0,
        "hotplug_off": cvm.qemu_hotplug_off,
        "image": image.name,
        "host_share_mode": cvm.host_share_mode,
        "spec_version": 1,
    }
    return {
        "kms_urls": list(vm.manifest.kms_urls or cvm.kms_urls),
        "gateway_urls": list(vm.manifest.gateway_urls or cvm.gateway_urls),
        "pccs_url": cvm.pccs_url,
        "collateral_urls": {"pccs": cvm.pccs_url},
        "nvidia_attestation_proxy_url": None,
        "docker_registry": cvm.docker_registry,
        "host_api_url": f"vsock://2:{config.host_api.port}/api",
        "vm_config": json.dumps(vm_config),
    }
