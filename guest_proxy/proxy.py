"""``/guest/<Method>``: forward a guest API call to the agent inside the VM named by ``id``.

The agent is called with pRPC JSON over the VM's channel (vsock or the serial fallback) and its
answer is decoded into the method's message, so the caller gets it in the encoding it asked
for (JSON or protobuf). A VM that is not running, or an agent that does not answer in time,
is a clear 409 or 503 naming the state: never a hang.

NetworkInfo also carries ``host_nics``: what the host knows of the VM's NICs (mode, MAC, bridge,
the IP of the latest DHCP lease), which the agent inside cannot know. The proxy fills it from the
callable it is given, replacing whatever the agent put there, so a guest cannot speak for the host.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

from google.protobuf.empty_pb2 import Empty
from google.protobuf.message import Message

from guest_proxy.transport import GuestAgentClient
from vmm.core.exceptions import InvalidField, Unavailable
from vmm.prpc import codec
from vmm.prpc.bridge import CallContext
from vmm.rpc import guest_api_pb2 as gpb

M = TypeVar("M", bound=Message)

AGENT_TIMEOUT = 10.0


class GuestProxyServicer:
    def __init__(
        self, agent_for: Callable[[str], GuestAgentClient], timeout: float = AGENT_TIMEOUT,
        host_nics: Callable[[str], Iterable[gpb.HostNic]] = lambda vm_id: (),
    ) -> None:
        # agent_for(vm_id) raises NotFound for an unknown VM and Conflict for one not running.
        self._agent_for = agent_for
        self.timeout = timeout
        # host_nics(vm_id): the host's view of the VM's NICs, for NetworkInfo's host_nics.
        self._host_nics = host_nics

    async def _forward(self, method: str, request: gpb.Id, output: type[M]) -> M:
        if not request.id:
            raise InvalidField("id", "is required")
        vm_id = request.id
        agent = self._agent_for(vm_id)
        try:
            value = await agent.call(method, timeout=self.timeout)
        except Unavailable as exc:
            raise Unavailable(f"guest agent of VM {vm_id} did not answer {method}: {exc.message}") from None
        try:
            message = codec.from_json_value(value, output)
        except ValueError as exc:
            raise Unavailable(f"guest agent of VM {vm_id} sent a malformed {method} answer: {exc}") from None
        assert isinstance(message, output)
        return message

    async def Info(self, request: gpb.Id, ctx: CallContext) -> gpb.GuestInfo:
        return await self._forward("Info", request, gpb.GuestInfo)

    async def SysInfo(self, request: gpb.Id, ctx: CallContext) -> gpb.SystemInfo:
        return await self._forward("SysInfo", request, gpb.SystemInfo)

    async def NetworkInfo(self, request: gpb.Id, ctx: CallContext) -> gpb.NetworkInformation:
        answer = await self._forward("NetworkInfo", request, gpb.NetworkInformation)
        del answer.host_nics[:]  # the host's to say, never the guest's
        answer.host_nics.extend(self._host_nics(request.id))
        return answer

    async def ListContainers(self, request: gpb.Id, ctx: CallContext) -> gpb.ListContainersResponse:
        return await self._forward("ListContainers", request, gpb.ListContainersResponse)

    async def Shutdown(self, request: gpb.Id, ctx: CallContext) -> Empty:
        return await self._forward("Shutdown", request, Empty)
