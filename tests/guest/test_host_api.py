"""The host API over the serial link: Notify effects, limits, GetSealingKey, bad frames."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from guest_agent.framing import (
    REQUEST,
    RESPONSE,
    FrameDecoder,
    decode_response,
    encode_frame,
    encode_request,
)
from tests.support.in_process import in_process_config, state_dir
from tests.support.key_provider_peer import key_provider_peer, sealed_for
from vmm.backend.qemu.backend import QemuBackend
from vmm.core.config import Config, KeyProviderConfig
from vmm.guest.host_api import HostApiLink
from vmm.host.capabilities import detect
from vmm.model.vm import Vm
from vmm.rpc import vmm_rpc_pb2 as pb
from vmm.supervisor.client import ensure_supervisor
from vmm.vms.manager import Manager

COMPOSE = json.dumps({"gateway_enabled": True, "runner": "docker-compose"})


@pytest.fixture
def state() -> Iterator[Path]:
    with state_dir("ha") as path:
        yield path


def make_config(state: Path, key_provider: KeyProviderConfig) -> Config:
    return in_process_config(state, key_provider=key_provider, event_buffer_size=5)


class Guest:
    """The test plays the guest's side of the host-API port (QEMU's socket end)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.decoder = FrameDecoder()
        self.next_id = 1

    async def call(self, method: str, request: Any, *, raw: bytes | None = None) -> tuple[int, Any]:
        request_id = self.next_id
        self.next_id += 1
        body = raw if raw is not None else json.dumps(request).encode()
        self.writer.write(encode_frame(REQUEST, request_id,
                                       encode_request(f"/api/{method}?json", "application/json", body)))
        await self.writer.drain()
        while True:
            data = await asyncio.wait_for(self.reader.read(65536), 10)
            assert data, "the daemon closed the link"
            for frame in self.decoder.feed(data):
                if frame.kind == RESPONSE and frame.id == request_id:
                    status, _, payload = decode_response(frame.payload)
                    return status, json.loads(payload) if payload else None


async def with_link(state: Path, key_provider: KeyProviderConfig, scenario: Any) -> None:
    config = make_config(state, key_provider)
    supervisor = await ensure_supervisor(
        Path(config.supervisor.sock), Path(config.supervisor.pid_file),
        Path(config.supervisor.log_file), state_file=Path(config.supervisor.state_file),
    )
    manager = Manager(config, detect(config.cvm), QemuBackend(config, supervisor))
    vm_id = await manager.create(pb.VmConfiguration(
        name="guest", image="dstack-dev-0.5.4", compose_file=COMPOSE, vcpu=1, memory=256,
        disk_size=1, stopped=True,
    ))
    vm = manager.get(vm_id)
    connected: asyncio.Queue[Guest] = asyncio.Queue()

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await connected.put(Guest(reader, writer))

    server = await asyncio.start_unix_server(accept, str(state / "host-api.sock"))
    link = HostApiLink(vm_id, state / "host-api.sock", manager.channels.bridge)
    link.start()
    guest = await asyncio.wait_for(connected.get(), 10)
    try:
        await scenario(guest, vm, manager)
    finally:
        await link.close()
        guest.writer.close()
        server.close()
        await manager.close()
        await supervisor.aclose()


def test_notify_updates_progress_events_and_instance_info(state: Path) -> None:
    """boot/shutdown progress, instance.info (file, instance id, app URL) and the event ring."""
    async def scenario(guest: Guest, vm: Vm, manager: Manager) -> None:
        assert await guest.call("Info", None) == (200, {"name": "dstack VMM", "version": "0.1.0"})
        for step in ("mounting host share", "starting services", "done"):
            assert await guest.call("Notify", {"event": "boot.progress", "payload": step}) == (200, None)
        assert vm.boot_progress == "done"
        info = {"instance_id_seed": "aa" * 20, "instance_id": "bb" * 20, "app_id": vm.manifest.app_id}
        await guest.call("Notify", {"event": "instance.info", "payload": json.dumps(info)})
        assert vm.instance_id == "bb" * 20
        assert json.loads(vm.workdir.instance_info.read_text()) == info
        assert vm.app_url == f"https://{'bb' * 20}-8090.localhost:8082"
        await guest.call("Notify", {"event": "boot.error", "payload": "failed to start containers"})
        assert vm.boot_error == "failed to start containers"
        await manager.set_desired(vm, started=True)
        await guest.call("Notify", {"event": "shutdown.progress", "payload": "powering off"})
        assert vm.shutdown_progress == "powering off"
        assert vm.started is False
        assert json.loads(vm.workdir.state.read_text()) == {"started": False}
        await guest.call("Notify", {"event": "custom.thing", "payload": "kept"})
        # The ring keeps only event_buffer_size (5) events, newest last.
        assert len(vm.events) == 5
        assert vm.events[-1].event == "custom.thing"
        status = manager.report.status(pb.StatusRequest(ids=[vm.id]))
        assert status.vms[0].instance_id == "bb" * 20
        assert status.vms[0].boot_error == "failed to start containers"
    asyncio.run(with_link(state, KeyProviderConfig(enabled=False), scenario))


def test_oversized_malformed_and_flooded_notifications(state: Path) -> None:
    """Payloads over 4 KiB are dropped but answered; bad bodies are 400; a flood keeps up."""
    async def scenario(guest: Guest, vm: Vm, manager: Manager) -> None:
        await guest.call("Notify", {"event": "boot.progress", "payload": "early"})
        status, _ = await guest.call("Notify", {"event": "boot.progress", "payload": "x" * 5000})
        assert status == 200
        assert vm.boot_progress == "early"
        status, body = await guest.call("Notify", None, raw=b"{not json")
        assert status == 400 and "malformed JSON" in body["error"]
        status, body = await guest.call("Notify", {"event": 5})
        assert status == 400 and "`event`" in body["error"]
        status, body = await guest.call("Nope", {})
        assert status == 400 and "Nope" in body["error"]
        guest.writer.write(b"\x7fVMM garbage that is not a frame" * 10)
        for i in range(300):
            await guest.call("Notify", {"event": "boot.progress", "payload": f"step {i}"})
        assert vm.boot_progress == "step 299"
        assert manager.report.status(pb.StatusRequest()).total == 1
    asyncio.run(with_link(state, KeyProviderConfig(enabled=False), scenario))


def test_get_sealing_key_uses_the_key_provider(state: Path) -> None:
    """GetSealingKey speaks the key-provider protocol; disabled gives a clear error."""
    with key_provider_peer() as (address, port, quotes):
        async def scenario(guest: Guest, vm: Vm, manager: Manager) -> None:
            quote = bytes(range(64))
            status, body = await guest.call("GetSealingKey", {"quote": quote.hex()})
            assert status == 200, body
            key, provider_quote = sealed_for(quote)
            assert body == {"encrypted_key": key.hex(), "provider_quote": provider_quote.hex()}
            assert quotes == [quote]
        asyncio.run(with_link(state, KeyProviderConfig(enabled=True, address=address, port=port),
                              scenario))

    async def disabled(guest: Guest, vm: Vm, manager: Manager) -> None:
        status, body = await guest.call("GetSealingKey", {"quote": "00"})
        assert status == 409 and body["error"] == "Key provider is not enabled"
    asyncio.run(with_link(state, replace(KeyProviderConfig(), enabled=False), disabled))


def test_unreachable_key_provider_is_unavailable(state: Path) -> None:
    """A key provider that is down gives 503 naming its address."""
    async def scenario(guest: Guest, vm: Vm, manager: Manager) -> None:
        status, body = await guest.call("GetSealingKey", {"quote": "00"})
        assert status == 503 and "127.0.0.1:1" in body["error"]
    asyncio.run(with_link(state, KeyProviderConfig(enabled=True, port=1), scenario))
