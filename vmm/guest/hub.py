"""Per-VM guest channels and what the guest tells us through them.

While a VM's QEMU runs it has an agent client (to call its guest agent) and, on the serial
fallback, a host-API link (to answer its calls). The hub keeps both by VM id, opens and closes
them, and applies the guest's notifications to the VM record: boot and shutdown progress, the
instance id, and events in the VM's ring. It gets what it needs of the registry as callables
(look a VM up, the owner of a CID, record the desired state), never the Manager itself.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

from guest_proxy.transport import (
    AGENT_VSOCK_PORT,
    GuestAgentClient,
    SerialTransport,
    Transport,
    VsockHttpTransport,
    vsock_factory,
)
from vmm.core.config import Config
from vmm.core.exceptions import InvalidField
from vmm.guest.host_api import HostApiLink, HostApiServicer
from vmm.host.capabilities import HostCapabilities
from vmm.model.compose import parse_compose
from vmm.model.vm import Vm
from vmm.prpc.bridge import PrpcBridge
from vmm.rpc import host_api_pb2

log = logging.getLogger(__name__)


class ChannelHub:
    def __init__(
        self,
        config: Config,
        host: HostCapabilities,
        *,
        lookup: Callable[[str], Vm | None],
        cid_owner: Callable[[int], str | None],
        set_desired: Callable[[Vm, bool], Awaitable[None]],
    ) -> None:
        self.config = config
        self.host = host
        self._cid_owner = cid_owner
        self._set_desired = set_desired
        # Hears how long each boot this daemon launched took, start to boot progress "done".
        self.boot_observer: Callable[[float], None] | None = None
        self._agents: dict[str, GuestAgentClient] = {}
        self._links: dict[str, HostApiLink] = {}
        self.bridge = PrpcBridge(
            host_api_pb2.DESCRIPTOR.services_by_name["HostApi"],
            HostApiServicer(config, lookup=lookup, notify=self.apply_notification),
            max_body=config.max_request_body,
        )

    def transport_for(self, vm: Vm) -> Transport:
        if self.host.channel == "vsock":
            return VsockHttpTransport(vsock_factory(vm.cid, AGENT_VSOCK_PORT))
        return SerialTransport(vm.workdir.agent_socket)

    def agent(self, vm: Vm) -> GuestAgentClient:
        agent = self._agents.get(vm.id)
        if agent is None:
            agent = self._agents[vm.id] = GuestAgentClient(self.transport_for(vm))
        return agent

    def open(self, vm: Vm) -> None:
        """Start answering the guest's host-API calls (the serial fallback needs a link)."""
        if self.host.channel == "serial" and vm.id not in self._links:
            link = self._links[vm.id] = HostApiLink(vm.id, vm.workdir.host_api_socket, self.bridge)
            link.start()

    async def close(self, vm: Vm) -> None:
        await self._close(vm.id)

    async def close_all(self) -> None:
        for vm_id in list(self._agents.keys() | self._links.keys()):
            await self._close(vm_id)

    async def _close(self, vm_id: str) -> None:
        agent, link = self._agents.pop(vm_id, None), self._links.pop(vm_id, None)
        if agent is not None:
            await agent.close()
        if link is not None:
            await link.close()

    def vm_for_cid(self, cid_text: str) -> str | None:
        """The VM a vsock peer CID belongs to (for the vsock host-API server)."""
        if not cid_text.isdigit():
            return None
        return self._cid_owner(int(cid_text))

    async def apply_notification(self, vm: Vm, event: str, payload: str) -> None:
        try:
            await self._apply(vm, event, payload)
        finally:
            # After the VM record changed, so the event bus reports the status it led to.
            vm.add_event(event, payload)

    async def _apply(self, vm: Vm, event: str, payload: str) -> None:
        if event == "boot.progress":
            vm.boot_progress = payload
            if payload == "done" and vm.launched_at is not None:
                if self.boot_observer is not None:
                    self.boot_observer(time.monotonic() - vm.launched_at)
                vm.launched_at = None
        elif event == "boot.error":
            vm.boot_error = payload
        elif event == "shutdown.progress":
            vm.shutdown_progress = payload
            if payload == "powering off":
                # The guest is going down on purpose: do not restart it behind its back.
                await self._set_desired(vm, False)
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
