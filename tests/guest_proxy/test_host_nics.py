"""/guest/NetworkInfo through GuestProxyServicer: the host's NICs added to the agent's answer."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from guest_agent.framing import REQUEST, RESPONSE, FrameDecoder, encode_frame, encode_response
from guest_proxy.proxy import GuestProxyServicer
from guest_proxy.transport import GuestAgentClient, SerialTransport
from tests.support import short_dirs
from vmm.prpc.bridge import CallContext
from vmm.rpc import guest_api_pb2 as gpb

# What an agent answers: its own view, plus host_nics it has no business sending.
AGENT_ANSWER = {
    "dns_servers": ["10.88.0.1"], "gateways": [{"address": "10.88.0.1"}],
    "interfaces": [{"name": "eth0", "addresses": [{"address": "10.88.0.23", "prefix": 24}]}],
    "host_nics": [{"index": 7, "mode": "bridge", "mac": "02:66:66:66:66:66", "ip": "6.6.6.6"}],
}  # fmt: skip
HOST_NICS = [gpb.HostNic(index=0, mode="bridge", mac="02:ab:cd:ef:01:23", bridge="br0",
                         ip="10.88.0.23"),
             gpb.HostNic(index=1, mode="user", mac="02:ab:cd:ef:01:24")]  # fmt: skip
CTX = CallContext(request_id="r", client="test", headers={})


@pytest.fixture
def short_dir() -> Iterator[Path]:
    with short_dirs.short_dir("gn") as path:
        yield path


async def agent_peer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """The agent's end of the serial channel: every request gets AGENT_ANSWER."""
    decoder = FrameDecoder()
    body = json.dumps(AGENT_ANSWER).encode()
    try:
        while data := await reader.read(65536):
            for frame in decoder.feed(data):
                assert frame.kind == REQUEST
                writer.write(encode_frame(RESPONSE, frame.id,
                                          encode_response(200, "application/json", body)))
            await writer.drain()
    finally:
        writer.close()


async def network_info(short_dir: Path, **proxy_options: Any) -> gpb.NetworkInformation:
    """NetworkInfo of VM "vm1" through a GuestProxyServicer (given ``proxy_options``) to agent_peer."""
    server = await asyncio.start_unix_server(agent_peer, str(short_dir / "agent.sock"))
    client = GuestAgentClient(SerialTransport(short_dir / "agent.sock"))
    try:
        proxy = GuestProxyServicer(lambda vm_id: client, **proxy_options)
        return await asyncio.wait_for(proxy.NetworkInfo(gpb.Id(id="vm1"), CTX), 30)
    finally:
        await client.close()
        server.close()
        await server.wait_closed()


def test_network_info_carries_the_hosts_nics_not_the_guests(short_dir: Path) -> None:
    """The agent's interfaces pass through; host_nics are the host's, for the VM asked about,
    and whatever the agent put there is dropped."""
    asked: list[str] = []

    def host_nics(vm_id: str) -> list[gpb.HostNic]:
        asked.append(vm_id)
        return HOST_NICS

    answer = asyncio.run(network_info(short_dir, host_nics=host_nics))
    assert asked == ["vm1"]
    assert list(answer.host_nics) == HOST_NICS
    assert answer.interfaces[0].name == "eth0"
    assert answer.interfaces[0].addresses[0].address == "10.88.0.23"
    assert [g.address for g in answer.gateways] == ["10.88.0.1"]


def test_without_a_host_view_host_nics_stay_empty(short_dir: Path) -> None:
    """A proxy given no host_nics callable still drops what the agent claimed there."""
    answer = asyncio.run(network_info(short_dir))
    assert len(answer.host_nics) == 0
    assert answer.dns_servers == ["10.88.0.1"]
