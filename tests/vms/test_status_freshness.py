"""Status (served from per-VM cached encodings) shows every change as soon as the call returns.

Each path that changes a VM is covered: RPCs, ReloadVms (including an in-place edit of the same
size, which only the file stamp's times reveal), a guest notification, and the watcher's
auto-restart. Status is read in both encodings, JSON and protobuf, right after the change.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import populate_images
from tests.guest.test_host_api import Guest, state, with_link  # noqa: F401 - the fixture
from tests.support.daemon_proc import start_daemon
from tests.support.short_dirs import short_dir
from tests.support.vm_ops import (
    FAKE_IMAGE,
    compose,
    create,
    events,
    idle_daemon,
    pid_gone,
    qemu_pid_of,
    rpc,
    vm_info,
    wait_for,
)
from vmm.core.config import KeyProviderConfig
from vmm.model.vm import Vm
from vmm.rpc import vmm_rpc_pb2 as pb
from vmm.vms.manager import Manager


def status_json(client: httpx.Client, vm_id: str, *, brief: bool = False) -> dict[str, Any]:
    answer = rpc(client, "Status", {"ids": [vm_id], "brief": brief})
    assert answer["total"] == 1, answer
    vm: dict[str, Any] = answer["vms"][0]
    return vm


def status_protobuf(client: httpx.Client, vm_id: str) -> pb.VmInfo:
    response = client.post("/prpc/Status", content=pb.StatusRequest(ids=[vm_id]).SerializeToString(),
                           headers={"Content-Type": "application/octet-stream"})
    assert response.status_code == 200, response.text
    answer = pb.StatusResponse.FromString(response.content)
    assert answer.total == 1
    return answer.vms[0]


def assert_status(client: httpx.Client, vm_id: str, **expected: Any) -> None:
    """Status full (JSON and protobuf) and brief (JSON) all show ``expected`` now."""
    full, brief, binary = (status_json(client, vm_id), status_json(client, vm_id, brief=True),
                           status_protobuf(client, vm_id))
    for key, value in expected.items():
        if key.startswith("configuration."):
            name = key.split(".", 1)[1]
            assert full["configuration"][name] == value, (key, full)
            assert getattr(binary.configuration, name) == value, key
        else:
            assert full[key] == value, (key, full)
            assert brief[key] == value, (key, brief)
            assert getattr(binary, key) == value, key


def test_dhcp_lease_shows_in_the_next_status() -> None:
    """A lease reported by the DHCP hook (ReportDhcpLease) shows in the next Status's interfaces."""
    with short_dir("vmsl") as workdir:
        populate_images(workdir / "state" / "images")
        daemon = start_daemon(workdir)
        try:
            with daemon.client() as client:
                vm_id = create(client, image=FAKE_IMAGE, stopped=True)
                nic = status_json(client, vm_id, brief=True)["interfaces"][0]
                assert nic["ip"] == ""
                rpc(client, "ReportDhcpLease", {"mac": nic["mac"], "ip": "10.9.8.7"})
                for answer in (status_json(client, vm_id), status_json(client, vm_id, brief=True)):
                    assert answer["interfaces"][0]["ip"] == "10.9.8.7"
                assert status_protobuf(client, vm_id).interfaces[0].ip == "10.9.8.7"
                rpc(client, "ReportDhcpLease", {"mac": nic["mac"], "ip": "10.9.8.7",
                                                "event": "del"})
                assert status_json(client, vm_id, brief=True)["interfaces"][0]["ip"] == ""
        finally:
            daemon.destroy()


def test_rpc_changes_show_in_the_next_status() -> None:
    """CreateVm, UpdateVm, StartVm/StopVm's desired state and RemoveVm show at once."""
    with short_dir("vmsf") as workdir:
        populate_images(workdir / "state" / "images")
        daemon = start_daemon(workdir)
        try:
            with daemon.client() as client:
                vm_id = create(client, image=FAKE_IMAGE, stopped=True)
                assert_status(client, vm_id, status="stopped", name="demo")
                status_json(client, vm_id)  # cached now
                rpc(client, "UpdateVm", {"id": vm_id, "compose_file": compose("v2"),
                                         "user_config": "cfg v2"})
                assert_status(client, vm_id, **{"configuration.compose_file": compose("v2"),
                                                "configuration.user_config": "cfg v2"})
                before = len(status_json(client, vm_id)["events"])
                rpc(client, "UpgradeApp", {"id": vm_id, "compose_file": compose("v3")})
                full = status_json(client, vm_id)
                assert full["configuration"]["compose_file"] == compose("v3")
                assert len(full["events"]) >= before
                rpc(client, "RemoveVm", {"id": vm_id})
                answer = rpc(client, "Status", {"ids": [vm_id]})
                assert answer["total"] == 0 or answer["vms"][0]["status"] == "removing", answer
        finally:
            daemon.destroy()


def test_reload_changes_show_in_the_next_status() -> None:
    """ReloadVms picks up an edited manifest, even one rewritten in place at the same size."""
    with short_dir("vmsr") as workdir:
        populate_images(workdir / "state" / "images")
        daemon = start_daemon(workdir)
        try:
            with daemon.client() as client:
                vm_id = create(client, image=FAKE_IMAGE, stopped=True, name="aaaa")
                manifest = workdir / "state" / "vm" / vm_id / "vm-manifest.json"
                rpc(client, "ReloadVms")  # stamps the files
                assert rpc(client, "ReloadVms")["updated"] == 0
                assert_status(client, vm_id, name="aaaa")
                for new in ("bbbb", "cccc"):
                    data = json.loads(manifest.read_bytes())
                    text = json.dumps(data | {"name": new}).encode()
                    # In place (same inode), the same size as before: only the times differ.
                    with manifest.open("r+b") as fp:
                        fp.write(text)
                        fp.truncate()
                    assert rpc(client, "ReloadVms")["updated"] == 1
                    assert_status(client, vm_id, name=new)
                    assert ("vmm.reloaded", "configuration re-read from disk") in events(
                        status_json(client, vm_id))
                state_file = manifest.with_name("vm-state.json")
                state_file.write_text(json.dumps({"started": False}))
                assert rpc(client, "ReloadVms")["updated"] == 0  # rewritten, but equal
        finally:
            daemon.destroy()


def test_guest_notification_shows_in_the_next_status(state: Path) -> None:  # noqa: F811
    """A Notify from the guest (boot progress, error, instance info) is in the next Status."""
    def encoded(manager: Manager, vm: Vm) -> tuple[dict[str, Any], pb.VmInfo]:
        reply = manager.report.status_encoded(pb.StatusRequest(ids=[vm.id]))
        return (json.loads(reply.json())["vms"][0],
                pb.StatusResponse.FromString(reply.protobuf()).vms[0])

    async def scenario(guest: Guest, vm: Vm, manager: Manager) -> None:
        encoded(manager, vm)  # cached now
        for step in ("mounting host share", "done"):
            await guest.call("Notify", {"event": "boot.progress", "payload": step})
            as_json, as_protobuf = encoded(manager, vm)
            assert as_json["boot_progress"] == as_protobuf.boot_progress == step
        await guest.call("Notify", {"event": "boot.error", "payload": "containers failed"})
        as_json, as_protobuf = encoded(manager, vm)
        assert as_json["boot_error"] == as_protobuf.boot_error == "containers failed"
        info = {"instance_id_seed": "aa" * 20, "instance_id": "bb" * 20,
                "app_id": vm.manifest.app_id}
        await guest.call("Notify", {"event": "instance.info", "payload": json.dumps(info)})
        as_json, as_protobuf = encoded(manager, vm)
        assert as_json["instance_id"] == as_protobuf.instance_id == "bb" * 20
        await guest.call("Notify", {"event": "custom.thing", "payload": "kept"})
        as_json, as_protobuf = encoded(manager, vm)
        assert as_json["events"][-1]["event"] == as_protobuf.events[-1].event == "custom.thing"
    asyncio.run(with_link(state, KeyProviderConfig(enabled=False), scenario))


@pytest.mark.qemu
def test_auto_restart_shows_in_the_next_status() -> None:
    """The watcher's exit and auto-restart show in Status as soon as GetInfo shows them."""
    config = ("[cvm.auto_restart]\nenabled = true\ninterval = 1\nmax_retries = 3\n"
              "initial_backoff = 1\nmax_backoff = 2\nreset_window = 600\n")
    with short_dir("vmsa") as workdir, idle_daemon(workdir, extra=config) as daemon, \
            daemon.client() as client:
        vm_id = create(client)
        vm_dir = workdir / "state" / "vm" / vm_id
        pid = wait_for("QEMU", lambda: qemu_pid_of(vm_dir))
        wait_for("status running", lambda: status_json(client, vm_id)["status"] == "running")
        status_json(client, vm_id)  # cached now
        os.kill(pid, signal.SIGKILL)
        wait_for(f"QEMU {pid} to die", lambda: pid_gone(pid))

        def restarted() -> bool:
            # GetInfo encodes afresh; Status comes from the cache and must never lag it.
            fresh = events(vm_info(client, vm_id))
            cached = events(status_json(client, vm_id))
            assert cached[: len(fresh)] == fresh, (fresh, cached)
            return ("vmm.auto_restart", "attempt 1 of 3: restarted") in fresh
        wait_for("the restart event", restarted, timeout=90)
        assert_status(client, vm_id, status="running")
        assert ("vmm.exited", "QEMU exited (signal 9)") in events(status_json(client, vm_id))
