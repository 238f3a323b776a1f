"""What Status, GetInfo and /guest/NetworkInfo say of VMs: selection, paging, each VM's view.

Reads only memory (the registry, the lease book, the config), never the backend or the disk, so
it answers on the event loop. The Status RPC's path goes through ``StatusCache``, which encodes
each VM's view once per state; ``status`` builds the same reply as messages (for in-process
callers and tests).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

from vmm.core.config import Config
from vmm.core.exceptions import VmNotFound
from vmm.model.vm import Vm
from vmm.net.nics import ResolvedNic, host_nics, interface_statuses, resolve_networks
from vmm.prpc import codec
from vmm.rpc import guest_api_pb2 as gpb
from vmm.rpc import vmm_rpc_pb2 as pb
from vmm.vms.status_cache import StatusCache

log = logging.getLogger(__name__)


class VmReport:
    def __init__(self, vms: Mapping[str, Vm], config: Config, guest_channel: str,
                 leased_ips: Callable[[str], dict[int, str]]) -> None:
        self._vms = vms
        self._config = config
        self._guest_channel = guest_channel
        # vm_id -> {NIC index: IP}; a change must bump the VM's version (the cache keys on it).
        self._leased_ips = leased_ips
        self.status_cache = StatusCache(
            vms, lambda vm, brief, _channel, now: self.vm_info(vm, brief=brief, now=now))

    def status(self, request: pb.StatusRequest) -> pb.StatusResponse:
        vms, total = self.select(request)
        return pb.StatusResponse(
            vms=[self.vm_info(vm, brief=request.brief) for vm in vms],
            port_mapping_enabled=self._config.cvm.port_mapping.enabled,
            total=total,
        )

    def status_encoded(self, request: pb.StatusRequest) -> codec.Encoded:
        """Status as ``status`` answers it, from the per-VM cache of encodings (the RPC's path)."""
        return self.status_cache.response(
            request, self.select, guest_channel=self._guest_channel,
            port_mapping_enabled=self._config.cvm.port_mapping.enabled)

    def select(self, request: pb.StatusRequest) -> tuple[list[Vm], int]:
        """The VMs a Status request asks for, in order and paged, and how many matched."""
        wanted = set(request.ids)
        vms = [vm for vm in self._vms.values() if not wanted or vm.id in wanted]
        if request.keyword:
            word = request.keyword
            vms = [vm for vm in vms if word in vm.manifest.name or word in vm.id
                   or word in vm.manifest.app_id or word in vm.manifest.image]
        vms.sort(key=lambda vm: (vm.manifest.created_at_ms, vm.id))
        total = len(vms)
        if request.page_size:
            # Pages count from 1 as in dstack's UI; page 0 is also the first page.
            first = (max(request.page, 1) - 1) * request.page_size
            vms = vms[first : first + request.page_size]
        return vms, total

    def vm_info(self, vm: Vm, *, brief: bool, now: float | None = None) -> pb.VmInfo:
        """Status/GetInfo's view of one VM, with every NIC (brief or not) and its leased IP."""
        info = vm.info(brief=brief, guest_channel=self._guest_channel, now=now)
        info.interfaces.extend(interface_statuses(self._nics_of(vm), self._leased_ips(vm.id)))
        return info

    def host_nics(self, vm_id: str) -> list[gpb.HostNic]:
        """The host's view of a VM's NICs with their leased IPs (/guest/NetworkInfo); 404 if unknown."""
        vm = self._vms.get(vm_id)
        if vm is None:
            raise VmNotFound(vm_id)
        return host_nics(self._nics_of(vm), self._leased_ips(vm.id))

    def _nics_of(self, vm: Vm) -> tuple[ResolvedNic, ...]:
        try:
            return resolve_networks(vm.manifest, self._config.cvm.networking)
        except ValueError as exc:  # config changed under the VM (e.g. the default bridge gone)
            log.warning("VM %s: cannot resolve its NICs: %s", vm.id, exc)
            return ()
