"""Port mappings on every path into a VM's definition: UpdateVm and manifests read from disk.

``ports[].host_address`` ends up inside QEMU's ``-netdev user,...`` option list, where text such
as ``,guestfwd=tcp:10.0.2.100:1234-cmd:...`` would run a host command; these tests drive the
real daemon (the conftest fixture: port mapping disabled) to show no path lets it through.
"""

from __future__ import annotations

import json
import shutil
import uuid
from typing import Any

import pytest

from tests.support.daemon_proc import DaemonProcess
from tests.support.vm_ops import COMPOSE, FAKE_IMAGE, call, create, error_of, rpc
from vmm.model.manifest import Manifest, ManifestError

EVIL = "::1%x,guestfwd=tcp:10.0.2.100:1234-cmd:touch X"


def mapping(address: str = "127.0.0.1", host_port: int = 2001) -> dict[str, Any]:
    return {"protocol": "tcp", "host_port": host_port, "vm_port": 80, "host_address": address}


def manifest_of(daemon: DaemonProcess, vm_id: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(
        (daemon.workdir / "state" / "vm" / vm_id / "vm-manifest.json").read_text())
    return data


def test_update_vm_refuses_option_text_in_host_address(daemon: DaemonProcess) -> None:
    """UpdateVm with a scope id carrying QEMU options is a 400 naming ports[0].host_address."""
    with daemon.client() as client:
        vm_id = create(client, FAKE_IMAGE, stopped=True)
        response = call(client, "UpdateVm",
                        {"id": vm_id, "update_ports": True, "ports": [mapping(EVIL)]})
        message = error_of(response, 400)
    assert "`ports[0].host_address`" in message and "is not an IPv4 address" in message
    assert manifest_of(daemon, vm_id)["port_map"] == []


def test_update_vm_ports_are_refused_while_port_mapping_is_disabled(daemon: DaemonProcess) -> None:
    """UpdateVm with ports gets CreateVm's "port mapping is disabled" 400; clearing is allowed."""
    with daemon.client() as client:
        created = error_of(call(client, "CreateVm", {
            "name": "demo", "image": FAKE_IMAGE, "compose_file": COMPOSE, "vcpu": 1, "memory": 64,
            "disk_size": 1, "stopped": True, "ports": [mapping()]}), 400)
        vm_id = create(client, FAKE_IMAGE, stopped=True)
        updated = error_of(call(client, "UpdateVm",
                                {"id": vm_id, "update_ports": True, "ports": [mapping()]}), 400)
        rpc(client, "UpdateVm", {"id": vm_id, "update_ports": True, "ports": []})
    assert updated == created == (
        "invalid field `ports`: port mapping is disabled (cvm.port_mapping.enabled)")
    assert manifest_of(daemon, vm_id)["port_map"] == []


def test_reload_does_not_load_a_manifest_with_option_text_in_an_address(
    daemon: DaemonProcess,
) -> None:
    """A manifest edited on disk with a bad address is left unloaded, so it can never start."""
    run = daemon.workdir / "state" / "vm"
    with daemon.client() as client:
        source = create(client, FAKE_IMAGE, stopped=True)
        copies = {}
        for address in ("127.0.0.1", EVIL, "127.0.0.1,guestfwd=tcp:10.0.2.100:1-cmd:id"):
            vm_id = str(uuid.uuid4())
            shutil.copytree(run / source, run / vm_id)
            data = manifest_of(daemon, vm_id) | {"id": vm_id, "port_map": [
                {"address": address, "protocol": "tcp", "from": 2001, "to": 80}]}
            (run / vm_id / "vm-manifest.json").write_text(json.dumps(data))
            copies[address] = vm_id
        assert rpc(client, "ReloadVms")["loaded"] == 1
        found = {address: rpc(client, "GetInfo", {"id": vm_id})["found"]
                 for address, vm_id in copies.items()}
    assert found == {"127.0.0.1": True, EVIL: False,
                     "127.0.0.1,guestfwd=tcp:10.0.2.100:1-cmd:id": False}


def manifest_json(address: str, host_port: int = 2001, vm_port: int = 80) -> str:
    return json.dumps({
        "id": "vm-1", "name": "a", "app_id": "ab", "image": "img", "vcpu": 1, "memory": 64,
        "disk_size": 1, "port_map": [
            {"address": address, "protocol": "tcp", "from": host_port, "to": vm_port}],
    })


@pytest.mark.parametrize("address", ["", "127.0.0.1", "0.0.0.0", "::1", "fd00::2"])
def test_manifest_reads_plain_addresses(address: str) -> None:
    """Empty (the configured default), IPv4 and scope-less IPv6 addresses load as written."""
    assert Manifest.loads(manifest_json(address)).port_map[0].address == address


@pytest.mark.parametrize("address", [
    EVIL, "fe80::1%eth0", "127.0.0.1,guestfwd=tcp:10.0.2.100:1-cmd:id", "[::1]", "localhost",
    "127.0.0.1\n",
])
def test_manifest_refuses_option_text_in_an_address(address: str) -> None:
    """An address that is not a plain IP literal makes the manifest unreadable, naming the key."""
    with pytest.raises(ManifestError, match=r"`port_map\[0\]\.address` must be an IP address"):
        Manifest.loads(manifest_json(address))


def test_manifest_port_numbers_are_bounded() -> None:
    """Ports above 65535 (or VM port 0) are refused; host port 0 (any free port) loads."""
    assert Manifest.loads(manifest_json("127.0.0.1", host_port=0)).port_map[0].host_port == 0
    with pytest.raises(ManifestError, match=r"`port_map\[0\]\.from` must be a port number"):
        Manifest.loads(manifest_json("127.0.0.1", host_port=70000))
    with pytest.raises(ManifestError, match=r"`port_map\[0\]\.to` must be a port number"):
        Manifest.loads(manifest_json("127.0.0.1", vm_port=0))
