"""Several NICs, their mappings and DHCP leases through the real daemon and scripts/dhcp-notify."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import populate_images
from tests.support.daemon_proc import REPO_ROOT, DaemonProcess, start_daemon
from tests.support.short_dirs import short_dir

TOKEN = "lease-test-token-0123456789"
HOOK = REPO_ROOT / "scripts" / "dhcp-notify"
COMPOSE = json.dumps({"manifest_version": 2, "name": "demo", "runner": "docker-compose"})
CONFIG = (
    '[auth]\nenabled = true\ntokens = ["' + TOKEN + '"]\n'
    '[cvm]\naccel = "tcg"\n'
    '[cvm.port_mapping]\nenabled = true\nrange = [{protocol = "tcp", from = 2000, to = 3000}]\n'
)
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def vm_request(**changes: Any) -> dict[str, Any]:
    return {"name": "nics", "image": "dstack-dev-0.5.4", "compose_file": COMPOSE, "vcpu": 1,
            "memory": 512, "disk_size": 2, "stopped": True} | changes  # fmt: skip


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    with short_dir("vmml") as path:
        populate_images(path / "state" / "images")
        yield path


@pytest.fixture(scope="module")
def daemon(workdir: Path) -> Iterator[DaemonProcess]:
    proc = start_daemon(workdir, addresses=["tcp:127.0.0.1:0", "unix:./vmm.sock"],
                        extra_config=CONFIG)  # fmt: skip
    try:
        yield proc
    finally:
        proc.destroy()


def call(daemon: DaemonProcess, method: str, body: dict[str, Any]) -> httpx.Response:
    with daemon.client(headers=AUTH) as client:
        return client.post(f"/prpc/{method}", json=body)


def create(daemon: DaemonProcess, **changes: Any) -> str:
    response = call(daemon, "CreateVm", vm_request(**changes))
    assert response.status_code == 200, response.text
    return str(response.json()["id"])


def interfaces(daemon: DaemonProcess, vm_id: str, *, brief: bool = True) -> list[dict[str, Any]]:
    response = call(daemon, "Status", {"ids": [vm_id], "brief": brief})
    assert response.status_code == 200, response.text
    return list(response.json()["vms"][0].get("interfaces", []))


def hook(daemon: DaemonProcess, *args: str, timeout: float = 3,
         **env: str) -> subprocess.CompletedProcess[str]:
    base = {"PATH": os.environ["PATH"], "VMM_SOCKET": str(daemon.unix[0]),
            "VMM_TOKEN": TOKEN, "VMM_HOOK_TIMEOUT": str(timeout)}  # fmt: skip
    return subprocess.run(["python3", str(HOOK), *args], env={**base, **env}, text=True,
                          capture_output=True, timeout=timeout + 20, check=False)  # fmt: skip


def test_get_meta_offers_only_modes_this_host_can_run(daemon: DaemonProcess) -> None:
    """supported_modes: user always, passt iff installed, bridge iff a bridge and a TUN device."""
    modes = call(daemon, "GetMeta", {}).json()["networking"]["supported_modes"]
    bridge = any(Path("/sys/class/net").glob("*/bridge")) and Path("/dev/net/tun").exists()
    expected = ["user"] + (["bridge"] if bridge else []) + (["passt"] if shutil.which("passt") else [])
    assert modes == expected


def test_two_nics_each_take_their_own_mapping(daemon: DaemonProcess) -> None:
    """Two user NICs: each mapping keeps the NIC it names; Status lists both NICs, brief too."""
    vm_id = create(daemon, networks=[{"mode": "user"}, {"mode": "user", "mac": "02:00:00:aa:00:01"}],
                   ports=[{"protocol": "tcp", "host_port": 2101, "vm_port": 80},
                          {"protocol": "tcp", "host_port": 2102, "vm_port": 80, "nic": 1}])  # fmt: skip
    nics = interfaces(daemon, vm_id)
    assert [(n["mode"], n["backend"], n.get("netdev_id"), n.get("index", 0)) for n in nics] == [
        ("user", "slirp", "net0", 0), ("user", "slirp", "net1", 1)]  # fmt: skip
    assert nics[1]["mac"] == "02:00:00:aa:00:01" and nics[0]["mac"] != nics[1]["mac"]
    info = call(daemon, "GetInfo", {"id": vm_id}).json()["info"]
    assert [p.get("nic", 0) for p in info["configuration"]["ports"]] == [0, 1]
    assert len(info["interfaces"]) == 2


BAD: list[tuple[dict[str, Any], str, str]] = [
    ({"networks": [{"mode": "custom"}]}, "networks[0].mode", "must be user or bridge"),
    ({"networks": [{"mode": "slirp"}]}, "networks[0].mode", "must be user or bridge"),
    ({"networks": [{"mode": "bridge", "bridge_name": "nosuchbr0"}]}, "networks[0].bridge_name",
     "no bridge 'nosuchbr0' on this host"),
    ({"networks": [{"mode": "bridge"}]}, "networks[0].bridge_name", "cvm.networking.bridge"),
    ({"networks": [{"mode": "user", "mac": "01:00:5e:00:00:01"}]}, "networks[0].mac", "multicast"),
    ({"networks": [{"mode": "user", "mac": "02:00:00:00:00:09"},
                   {"mode": "user", "mac": "02:00:00:00:00:09"}]}, "networks[1].mac",
     "duplicates networks[0]"),
    ({"ports": [{"protocol": "tcp", "host_port": 2201, "vm_port": 80, "nic": 3}]},
     "ports[0].nic", "no NIC 3"),
    ({"ports": [{"protocol": "tcp", "host_port": 2201, "vm_port": 70000}]}, "ports[0].vm_port",
     "1..65535"),
]  # fmt: skip


@pytest.mark.parametrize(("changes", "field", "reason"), BAD)
def test_bad_networks_are_refused_naming_the_field(
    daemon: DaemonProcess, changes: dict[str, Any], field: str, reason: str
) -> None:
    """Unknown modes, missing bridges, non-unicast or duplicate MACs, bad NICs/ports: 400."""
    response = call(daemon, "CreateVm", vm_request(**changes))
    assert response.status_code == 400, response.text
    assert f"`{field}`" in response.text and reason in response.text
    assert "/sys" not in response.text


def test_update_refuses_networks_that_strand_a_mapping(daemon: DaemonProcess) -> None:
    """UpdateVm dropping the NIC a mapping targets is refused naming the mapping, not applied."""
    vm_id = create(daemon, name="strand", networks=[{"mode": "user"}, {"mode": "user"}],
                   ports=[{"protocol": "tcp", "host_port": 2301, "vm_port": 80, "nic": 1}])  # fmt: skip
    response = call(daemon, "UpdateVm", {"id": vm_id, "update_networking": True,
                                         "networks": [{"mode": "user"}]})  # fmt: skip
    assert response.status_code == 400, response.text
    assert "`ports[0].nic`" in response.text and "no NIC 1" in response.text
    assert len(interfaces(daemon, vm_id)) == 2


def test_hook_reports_leases_and_del_clears_them(daemon: DaemonProcess) -> None:
    """add records the NIC's IP, old renews it, a stale del is ignored, the matching del clears."""
    vm_id = create(daemon, name="leased", networks=[{"mode": "user"}, {"mode": "user"}])
    mac = interfaces(daemon, vm_id)[1]["mac"]
    done = hook(daemon, "add", mac, "10.88.0.12", "guest")
    assert done.returncode == 0, done.stderr
    assert [n.get("ip", "") for n in interfaces(daemon, vm_id)] == ["", "10.88.0.12"]
    assert hook(daemon, "old", mac, "10.88.0.12").returncode == 0
    assert hook(daemon, "del", mac, "10.88.0.99").returncode == 0  # not its lease: kept
    assert interfaces(daemon, vm_id, brief=False)[1]["ip"] == "10.88.0.12"
    assert hook(daemon, "del", mac, "10.88.0.12").returncode == 0
    assert [n.get("ip", "") for n in interfaces(daemon, vm_id)] == ["", ""]


def test_hook_with_a_token_file_and_an_unknown_mac(daemon: DaemonProcess, workdir: Path) -> None:
    """The token may come from a file; a MAC of no VM is accepted, ignored and logged."""
    token_file = workdir / "hook-token"
    token_file.write_text(TOKEN + "\n")
    done = hook(daemon, "add", "02:99:99:99:99:99", "10.88.0.50", VMM_TOKEN="",
                VMM_TOKEN_FILE=str(token_file))  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "02:99:99:99:99:99 -> 10.88.0.50 ignored: no VM has this MAC" in daemon.log()


@pytest.mark.parametrize("token", ["", "wrong-token"])
def test_hook_without_a_valid_token_fails_loudly(daemon: DaemonProcess, token: str) -> None:
    """No token or a wrong one: the daemon answers 401 and the hook says so on stderr, exit 1."""
    vm_id = create(daemon, name=f"tok{len(token)}")
    mac = interfaces(daemon, vm_id)[0]["mac"]
    done = hook(daemon, "add", mac, "10.88.0.13", VMM_TOKEN=token)
    assert done.returncode == 1 and "401" in done.stderr
    assert interfaces(daemon, vm_id)[0].get("ip", "") == ""


def test_hook_event_is_checked(daemon: DaemonProcess) -> None:
    """ReportDhcpLease refuses an unknown event naming the field; non-lease hook calls are no-ops."""
    response = call(daemon, "ReportDhcpLease", {"mac": "02:00:00:00:00:01", "ip": "10.0.0.1",
                                                "event": "expire"})  # fmt: skip
    assert response.status_code == 400 and "`event`" in response.text
    assert hook(daemon, "init").returncode == 0
    assert hook(daemon, "add", "02:00:00:00:00:01").returncode == 2


def test_hook_exits_within_its_timeout_when_the_daemon_is_down(workdir: Path) -> None:
    """A socket nobody answers on and one that does not exist: exit 1 with the reason, promptly."""
    silent = workdir / "silent.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(silent))
        listener.listen(1)  # accepted by the kernel, never answered
        for path in (silent, workdir / "absent.sock"):
            started = time.monotonic()
            done = subprocess.run(
                ["python3", str(HOOK), "add", "02:00:00:00:00:01", "10.88.0.14"],
                env={"PATH": os.environ["PATH"], "VMM_SOCKET": str(path), "VMM_HOOK_TIMEOUT": "1"},
                text=True, capture_output=True, timeout=20, check=False,
            )  # fmt: skip
            assert done.returncode == 1, done.stderr
            assert ("timed out" in done.stderr or "no answer" in done.stderr
                    or "FileNotFoundError" in done.stderr)  # fmt: skip
            assert time.monotonic() - started < 15  # bounded by the hook, not by dnsmasq


def test_leases_survive_a_restart_and_die_with_the_vm(workdir: Path) -> None:
    """A recorded IP is still shown after a daemon restart; after RemoveVm its MAC is unknown."""
    with short_dir("vmmr") as other:
        populate_images(other / "state" / "images")
        first = start_daemon(other, addresses=["tcp:127.0.0.1:0", "unix:./vmm.sock"],
                             extra_config=CONFIG)  # fmt: skip
        try:
            vm_id = create(first, name="persist")
            mac = interfaces(first, vm_id)[0]["mac"]
            assert hook(first, "add", mac, "10.88.0.20").returncode == 0
            assert (other / "state" / "vm" / vm_id / "dhcp-leases.json").exists()
        finally:
            first.stop()
        second = start_daemon(other, addresses=["tcp:127.0.0.1:0", "unix:./vmm.sock"],
                              extra_config=CONFIG)  # fmt: skip
        try:
            assert interfaces(second, vm_id)[0]["ip"] == "10.88.0.20"
            assert call(second, "RemoveVm", {"id": vm_id}).status_code == 200
            deadline = time.monotonic() + 30
            while call(second, "Status", {"ids": [vm_id]}).json().get("vms"):
                assert time.monotonic() < deadline, "the VM was not removed"
                time.sleep(0.2)
            assert hook(second, "add", mac, "10.88.0.21").returncode == 0
            assert f"{mac} -> 10.88.0.21 ignored: no VM has this MAC" in second.log()
        finally:
            second.destroy()
