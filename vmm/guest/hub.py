"""Per-VM guest channels and what the guest tells us through them.

While a VM's QEMU runs it has an agent client (to call its guest agent) and, on the serial
fallback, a host-API link (to answer its calls). This module opens and closes them, and applies
the guest's notifications to the VM record: boot and shutdown progress, the instance id, and
events in the VM's ring.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from guest_proxy.transport import (
    AGENT_VSOCK_PORT,
    GuestAgentClient,
    SerialTransport,
    Transport,
    VsockHttpTransport,
    vsock_factory,
)
from vmm.backend.qemu import argv as qemu_argv
from vmm.core.config import Config
from vmm.core.exceptions import InvalidField
from vmm.guest.host_api import HostApiLink, HostApiServicer
from vmm.host.capabilities import HostCapabilities
from vmm.model.compose import parse_compose
from vmm.prpc.bridge import PrpcBridge
from vmm.rpc import host_api_pb2

if TYPE_CHECKING:
    from vmm.model.vm import Vm
    from vmm.vms.manager import Manager

log = logging.getLogger(__name__)


class ChannelHub:
    def __init__(self, manager: Manager, config: Config, host: HostCapabilities) -> None:
        self.manager = manager
        self.config = config
        self.host = host
        self.bridge = PrpcBridge(
            host_api_pb2.DESCRIPTOR.services_by_name["HostApi"],
            HostApiServicer(manager, config),
            max_body=config.max_request_body,
        )

    def transport_for(self, vm: Vm) -> Transport:
        if self.host.channel == "vsock":
            return VsockHttpTransport(vsock_factory(vm.cid, AGENT_VSOCK_PORT))
        return SerialTransport(vm.workdir.path / qemu_argv.AGENT_SOCKET)

    def agent(self, vm: Vm) -> GuestAgentClient:
        if vm.agent is None:
            vm.agent = GuestAgentClient(self.transport_for(vm))
        return vm.agent

    def open(self, vm: Vm) -> None:
        """Start answering the guest's host-API calls (the serial fallback needs a link)."""
        if self.host.channel == "serial" and vm.host_link is None:
            vm.host_link = HostApiLink(
                vm.id, vm.workdir.path / qemu_argv.HOST_API_SOCKET, self.bridge
            )
            vm.host_link.start()

    async def close(self, vm: Vm) -> None:
        agent, link = vm.agent, vm.host_link
        vm.agent, vm.host_link = None, None
        if agent is not None:
            await agent.close()
        if link is not None:
            await link.close()

    def vm_for_cid(self, cid_text: str) -> str | None:
        """The VM a vsock peer CID belongs to (for the vsock host-API server)."""
        if not cid_text.isdigit():
            return None
        return self.manager.cids.owner(int(cid_text))

    async def apply_notification(self, vm: Vm, event: str, payload: str) -> None:
        vm.add_event(event, payload)
        if event == "boot.progress":
            vm.boot_progress = payload
        elif event == "boot.error":
            vm.boot_error = payload
        elif event == "shutdown.progress":
            vm.shutdown_progress = payload
            if payload == "powering off":
                # The guest is going down on purpose: do not restart it behind its back.
                await self.manager.set_desired(vm, started=False)
        elif event == "instance.info":
            await self._instance_info(vm, payload)
        else:
            log.info("VM %s: unknown guest event %r stored", vm.id, event)

    async def _instance_info(self, vm: Vm, payload: str) -> None:
        try:
            info = json.loads(payload)
        except json.JSONDecodeError:
            log.info("VM %s: instance.info is not JSON; ignored", vm.id)
            return
        if not isinstance(info, dict):
            return
        instance_id = info.get("instance_id")
        vm.instance_id = instance_id if isinstance(instance_id, str) else ""
        vm.app_url = self.app_url(vm)
        await asyncio.to_thread(vm.workdir.write_json, vm.workdir.instance_info, info)

    def app_url(self, vm: Vm) -> str:
        """The app's public URL (§9): only with the gateway on and an instance id known."""
        if not vm.instance_id:
            return ""
        try:
            gateway_on = parse_compose(vm.shared.compose).gateway_enabled
        except InvalidField:
            return ""
        if not gateway_on:
            return ""
        gateway = self.config.gateway
        host, port = gateway.base_domain, gateway.port
        if vm.manifest.gateway_urls:
            first = urlsplit(vm.manifest.gateway_urls[0])
            host, port = first.hostname or host, first.port or 443
        suffix = "" if port == 443 else f":{port}"
        return f"https://{vm.instance_id}-{gateway.agent_port}.{host}{suffix}"
