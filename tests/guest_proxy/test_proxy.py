"""/guest/<Method> and guest-reported status on real QEMU with the development image."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon_proc import DaemonProcess, start_daemon
from tests.support.guest_image import ensure_guest_image
from tests.support.qmp import QMPClient
from tests.support.short_dirs import short_dir
from tests.support.vm_ops import rpc, vm_info
from tests.vms.test_manager import COMPOSE, qemu_config, wait_for
from vmm.rpc import guest_api_pb2 as gpb

pytestmark = pytest.mark.qemu

VCPU, MEMORY_MB = 2, 768


@pytest.fixture(scope="module")
def booted() -> Iterator[tuple[DaemonProcess, str]]:
    """One daemon with one VM that has finished booting (boot_progress done)."""
    image = ensure_guest_image()
    with short_dir("vmmg") as workdir:
        daemon = start_daemon(workdir, extra_config=qemu_config(image))
        try:
            with daemon.client() as client:
                vm_id = rpc(client, "CreateVm", {
                    "name": "guest-api", "image": image.name, "compose_file": COMPOSE,
                    "vcpu": VCPU, "memory": MEMORY_MB, "disk_size": 2,
                })["id"]
                wait_for("boot_progress done",
                         lambda: vm_info(client, vm_id)["boot_progress"] == "done", timeout=180)
            yield daemon, vm_id
        finally:
            daemon.destroy()


def guest(daemon: DaemonProcess, method: str, vm_id: str) -> Any:
    with daemon.client() as client:
        response = client.post(f"/guest/{method}?json", json={"id": vm_id})
    assert response.status_code == 200, response.text
    return response.json()


def test_status_reports_what_the_guest_said(booted: tuple[DaemonProcess, str]) -> None:
    """boot_progress reaches done, the instance id arrives, events show the boot steps."""
    daemon, vm_id = booted
    with daemon.client() as client:
        info = vm_info(client, vm_id)
        meta = rpc(client, "GetMeta")
    assert info["boot_progress"] == "done"
    assert info["instance_id"] and len(info["instance_id"]) == 40
    assert info["guest_channel"] == meta["host"]["guest_channel"] == "serial"
    events = [(e["event"], e["body"]) for e in info["events"]]
    assert ("boot.progress", "done") in events
    assert any(name == "instance.info" for name, _ in events)
    instance_info = daemon.workdir / "state" / "vm" / vm_id / "shared" / ".instance_info"
    assert info["instance_id"] in instance_info.read_text()


def test_guest_info_matches_the_vm(booted: tuple[DaemonProcess, str]) -> None:
    """/guest/Info reports the VM's app id and instance id and says there is no TEE."""
    daemon, vm_id = booted
    with daemon.client() as client:
        info = vm_info(client, vm_id)
    answer = guest(daemon, "Info", vm_id)
    assert answer["app_id"] == info["app_id"]
    assert answer["instance_id"] == info["instance_id"]
    assert "none" in answer["tcb_info"]
    assert answer["device_id"]


def test_sys_info_matches_the_vm(booted: tuple[DaemonProcess, str]) -> None:
    """SysInfo's CPU count and memory are the VM's vcpu and memory, read inside the guest."""
    daemon, vm_id = booted
    answer = guest(daemon, "SysInfo", vm_id)
    assert answer["num_cpus"] == VCPU
    total_mb = answer["total_memory"] / 2**20
    assert MEMORY_MB * 0.8 < total_mb <= MEMORY_MB
    assert answer["os_name"].startswith("Debian")
    assert any(d["mount_point"] == "/" and d["name"] == "/dev/vda" for d in answer["disks"])


def test_network_info_lists_the_guest_nic(booted: tuple[DaemonProcess, str]) -> None:
    """NetworkInfo lists eth0 with its user-mode DHCP address and the gateway, and host_nics
    (added by the daemon) the VM's one user NIC as Status lists it, with no lease."""
    daemon, vm_id = booted
    answer = guest(daemon, "NetworkInfo", vm_id)
    with daemon.client() as client:
        status_nic = vm_info(client, vm_id)["interfaces"][0]
    assert answer["host_nics"] == [{"index": 0, "mode": "user", "mac": status_nic["mac"],
                                    "bridge": "", "ip": ""}]  # fmt: skip
    nics = {nic["name"]: nic for nic in answer["interfaces"]}
    assert "eth0" in nics
    assert any(a["address"].startswith("10.0.2.") and a["prefix"] == 24
               for a in nics["eth0"]["addresses"])
    assert nics["eth0"]["rx_bytes"] > 0
    assert {"address": "10.0.2.2"} in answer["gateways"]


def test_list_containers_without_docker(booted: tuple[DaemonProcess, str]) -> None:
    """Without a Docker socket in the guest, ListContainers is an empty list."""
    daemon, vm_id = booted
    assert guest(daemon, "ListContainers", vm_id) == {"containers": []}


def test_protobuf_callers_get_protobuf(booted: tuple[DaemonProcess, str]) -> None:
    """A protobuf request through /guest gets a protobuf answer decoded from the agent's JSON."""
    daemon, vm_id = booted
    with daemon.client() as client:
        response = client.post("/guest/SysInfo", content=gpb.Id(id=vm_id).SerializeToString(),
                               headers={"Content-Type": "application/octet-stream"})
    assert response.status_code == 200
    assert gpb.SystemInfo.FromString(response.content).num_cpus == VCPU


def test_concurrent_proxy_calls(booted: tuple[DaemonProcess, str]) -> None:
    """Many clients at once over the one serial channel each get a correct answer."""
    daemon, vm_id = booted
    methods = ["SysInfo", "NetworkInfo", "Info", "ListContainers"] * 8
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda m: (m, guest(daemon, m, vm_id)), methods))
    for method, answer in answers:
        key = {"SysInfo": "num_cpus", "NetworkInfo": "interfaces", "Info": "app_id",
               "ListContainers": "containers"}[method]
        assert key in answer


def test_bad_targets(booted: tuple[DaemonProcess, str]) -> None:
    """Unknown VM is 404, a missing id 400, an unknown method 400."""
    daemon, _ = booted
    with daemon.client() as client:
        assert client.post("/guest/SysInfo?json", json={"id": "nope"}).status_code == 404
        assert client.post("/guest/SysInfo?json", json={}).status_code == 400
        unknown = client.post("/guest/Reboot?json", json={"id": "nope"})
    assert unknown.status_code == 400
    assert "Reboot" in unknown.json()["error"]


def test_paused_guest_times_out_instead_of_hanging(booted: tuple[DaemonProcess, str]) -> None:
    """A guest whose vCPUs are paused gives a 503 after the agent timeout, then recovers."""
    daemon, vm_id = booted
    qmp = QMPClient(daemon.workdir / "state" / "vm" / vm_id / "qmp.sock")
    qmp.execute("stop")
    try:
        started = time.monotonic()
        with daemon.client() as client:
            response = client.post("/guest/SysInfo?json", json={"id": vm_id})
        assert response.status_code == 503
        assert "did not answer SysInfo" in response.json()["error"]
        assert time.monotonic() - started < 30
    finally:
        qmp.execute("cont")
        qmp.close()
    wait_for("the agent to answer again",
             lambda: guest(daemon, "SysInfo", vm_id)["num_cpus"] == VCPU, timeout=30)


def test_shutdowns_stopped_vm_and_killed_agent(workdir_image: tuple[Path, Path]) -> None:
    """ShutdownVm and /guest/Shutdown go through the agent; stopped VMs 409; a killed VM 503s."""
    workdir, image = workdir_image
    daemon = start_daemon(workdir, extra_config=qemu_config(image))
    try:
        with daemon.client() as client:
            vm_id = rpc(client, "CreateVm", {"name": "short", "image": image.name,
                                             "compose_file": COMPOSE, "vcpu": 1, "memory": 512,
                                             "disk_size": 2})["id"]
            wait_for("boot", lambda: vm_info(client, vm_id)["boot_progress"] == "done", 180)
            assert rpc(client, "ShutdownVm", {"id": vm_id}) is None
            wait_for("power-off", lambda: vm_info(client, vm_id)["status"] == "stopped", timeout=60)
            wait_for("the recorded outcome", lambda: "graceful: the guest powered off (guest agent)"
                     in [e["body"] for e in vm_info(client, vm_id)["events"]], timeout=30)

            rpc(client, "StartVm", {"id": vm_id})
            wait_for("boot", lambda: vm_info(client, vm_id)["boot_progress"] == "done", 180)
            assert guest(daemon, "Shutdown", vm_id) is None
            info = wait_for("power-off", lambda: (i := vm_info(client, vm_id))["status"] == "stopped"
                            and i, timeout=60)
            assert info["shutdown_progress"] in ("powering off", "stopped")
            assert ("shutdown.progress", "powering off") in [(e["event"], e["body"])
                                                              for e in info["events"]]
            stopped = client.post("/guest/SysInfo?json", json={"id": vm_id})
            assert stopped.status_code == 409
            assert "not running (status: stopped)" in stopped.json()["error"]

            rpc(client, "StartVm", {"id": vm_id})
            wait_for("boot", lambda: vm_info(client, vm_id)["boot_progress"] == "done", 180)
            pid = int((workdir / "state" / "vm" / vm_id / "qemu.pid").read_text())
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                qmp = QMPClient(workdir / "state" / "vm" / vm_id / "qmp.sock")
                qmp.execute("stop")  # the call below is now in flight with nobody to answer it
                call = pool.submit(client.post, "/guest/SysInfo?json", json={"id": vm_id})
                time.sleep(0.5)
                os.kill(pid, signal.SIGKILL)
                qmp.close()
                response = call.result(timeout=30)
            assert response.status_code in (503, 409)
    finally:
        daemon.destroy()


@pytest.fixture
def workdir_image() -> Iterator[tuple[Path, Path]]:
    with short_dir("vmmh") as path:
        yield path, ensure_guest_image()
