"""CreateVm input checks: every field's bad value is a 4xx naming it, leaving nothing behind."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import populate_images
from tests.support.daemon_proc import DaemonProcess, start_daemon
from tests.support.root_disk_image import ROOTED_IMAGE, make_root_disk_image
from tests.support.short_dirs import short_dir
from vmm.core.config import Config, NetworkingConfig, PortMappingConfig, PortRange
from vmm.core.exceptions import InvalidField
from vmm.model.images import load_image
from vmm.rpc import vmm_rpc_pb2 as pb
from vmm.vms.request import check_disk_fits_image, check_networks, check_ports

COMPOSE = json.dumps({"manifest_version": 2, "name": "demo", "runner": "docker-compose"})
GOOD: dict[str, Any] = {
    "name": "demo", "image": "dstack-dev-0.5.4", "compose_file": COMPOSE, "vcpu": 1,
    "memory": 512, "disk_size": 2, "stopped": True,
}


@pytest.fixture(scope="module")
def daemon() -> Iterator[DaemonProcess]:
    with short_dir("vmmr") as workdir:
        populate_images(workdir / "state" / "images")
        make_root_disk_image(workdir / "state" / "images")  # a 1.5 GiB root disk
        proc = start_daemon(workdir, extra_config=(
            '[cvm]\naccel = "tcg"\nmax_allocable_vcpu = 8\nmax_allocable_memory_in_mb = 8192\n'
            "max_disk_size_gb = 100\n"
            '[cvm.port_mapping]\nenabled = true\nrange = [{protocol = "tcp", from = 2000, to = 3000}]\n'
        ))
        try:
            yield proc
        finally:
            proc.destroy()


def vm_dirs(daemon: DaemonProcess) -> list[str]:
    run = daemon.workdir / "state" / "vm"
    return sorted(p.name for p in run.iterdir()) if run.exists() else []


BAD_FIELDS: list[tuple[dict[str, Any], int, str]] = [
    ({"name": ""}, 400, "`name`: is required"),
    ({"name": "a/b"}, 400, "`name`"),
    ({"name": "x" * 300}, 400, "`name`"),
    ({"image": ""}, 400, "`image`: is required"),
    ({"image": "../etc"}, 400, "`image`"),
    ({"image": "no-such-image"}, 400, "no image named 'no-such-image'"),
    ({"image": "broken-json"}, 400, "`image`"),
    ({"image": "old-0.4.0"}, 400, "unsupported image version"),
    ({"compose_file": ""}, 400, "`compose_file`: is required"),
    ({"compose_file": "{nope"}, 400, "`compose_file`: is not valid JSON"),
    ({"compose_file": '"str"'}, 400, "`compose_file`: must be a JSON object"),
    ({"compose_file": '{"kms_enabled": "yes"}'}, 400, "compose_file.kms_enabled"),
    ({"vcpu": 0}, 400, "`vcpu`: must be 1..8"),
    ({"vcpu": 9}, 400, "`vcpu`: must be 1..8"),
    ({"vcpu": -1}, 400, "`vcpu`"),
    ({"vcpu": "2"}, 400, "`vcpu`: expected an integer"),
    ({"memory": 10}, 400, "`memory`: must be 64..8192"),
    ({"memory": 9000}, 400, "`memory`"),
    ({"memory": None}, 400, "`memory`: null"),
    ({"disk_size": 0}, 400, "`disk_size`: must be 1..100"),
    ({"disk_size": 101}, 400, "`disk_size`"),
    ({"ports": [{"protocol": "sctp", "host_port": 2001, "vm_port": 1}]}, 400, "ports[0].protocol"),
    ({"ports": [{"protocol": "tcp", "host_port": 80, "vm_port": 1}]}, 400,
     "port mapping is not allowed for tcp:80"),
    ({"ports": [{"protocol": "tcp", "host_port": 2001, "vm_port": 0}]}, 400, "ports[0].vm_port"),
    ({"ports": [{"protocol": "tcp", "host_port": 2001, "vm_port": 70000}]}, 400, "ports[0].vm_port"),
    ({"ports": [{"protocol": "tcp", "host_port": 2001, "vm_port": 1, "host_address": "me"}]}, 400,
     "ports[0].host_address"),
    ({"ports": [{"protocol": "tcp", "host_port": 2001, "vm_port": 1},
                {"protocol": "tcp", "host_port": 2001, "vm_port": 2}]}, 400,
     "`ports[1]`: duplicates ports[0]"),
    ({"ports": {"host_port": 1}}, 400, "`ports`: expected an array"),
    ({"ports": [{"protocol": "tcp", "host_port": 2001, "vm_port": 1,
                 "host_address": "::1%x,guestfwd=tcp:10.0.2.100:1234-cmd:touch X"}]}, 400,
     "`ports[0].host_address`: '::1%x,guestfwd=tcp:10.0.2.100:1234-cmd:touch X' is not an IPv4"),
    ({"ports": [{"protocol": "tcp", "host_port": 2001, "vm_port": 1, "host_address": "::1"}]},
     400, "`ports[0].host_address`: '::1' is not an IPv4"),
    ({"ports": [{"protocol": "tcp", "host_port": 2001, "vm_port": 1,
                 "host_address": "127.0.0.1,guestfwd=tcp:10.0.2.100:1-cmd:id"}]}, 400,
     "`ports[0].host_address`"),
    ({"encrypted_env": "xyzw"}, 400, "`encrypted_env`: not a hex string"),
    ({"app_id": "not hex!"}, 400, "`app_id`"),
    ({"gpus": {"attach_mode": "all"}}, 400, "GPU passthrough is not enabled"),
    ({"gpus": {"gpus": [{"slot": "18:00.0"}]}}, 400, "GPU passthrough is not enabled"),
    ({"kms_urls": ["ftp://kms"]}, 400, "`kms_urls[0]`"),
    ({"gateway_urls": [7]}, 400, "`gateway_urls[0]`: expected a string"),
    ({"networking": {"mode": "custom"}}, 400, "`networking.mode`"),
    ({"networks": [{"mode": "user", "bridge_name": "br0"}]}, 400, "networks[0].bridge_name"),
    ({"networks": [{"mode": "bridge", "bridge_name": "nonexistent-br"}]}, 400,
     "no bridge 'nonexistent-br'"),
    ({"networks": [{"mode": "bridge", "bridge_name": "../../../etc"}]}, 400,
     "`networks[0].bridge_name`: '../../../etc' contains a path separator"),
    ({"networks": [{"mode": "bridge", "bridge_name": ".."}]}, 400, "networks[0].bridge_name"),
    ({"networks": [{"mode": "bridge", "bridge_name": "lo"}]}, 400, "no bridge 'lo' on this host"),
    ({"image": ROOTED_IMAGE, "disk_size": 1}, 400,
     f"`disk_size`: must be at least 2 GiB for image '{ROOTED_IMAGE}'"),
    ({"simulated_tee": "dstack-tdx"}, 400, "`simulated_tee`"),
    ({"stopped": "yes"}, 400, "`stopped`: expected true or false"),
    ({"user_config": 5}, 400, "`user_config`: expected a string"),
]


@pytest.mark.parametrize(("change", "status", "fragment"), BAD_FIELDS,
                         ids=[next(iter(c)) + str(i) for i, (c, _, _) in enumerate(BAD_FIELDS)])
def test_bad_field_is_refused_naming_it(
    daemon: DaemonProcess, change: dict[str, Any], status: int, fragment: str
) -> None:
    """Each bad CreateVm field gives a 4xx whose message names it; no directory is written."""
    before = vm_dirs(daemon)
    with daemon.client() as client:
        response = client.post("/prpc/CreateVm?json", json=GOOD | change)
    assert response.status_code == status, response.text
    assert fragment in response.json()["error"]
    assert vm_dirs(daemon) == before


def test_good_request_creates_a_stopped_vm(daemon: DaemonProcess) -> None:
    """A valid stopped create writes the work directory in dstack's format and does not boot."""
    with daemon.client() as client:
        response = client.post("/prpc/CreateVm?json", json=GOOD | {
            "name": "keeper", "encrypted_env": "0xdeadbeef", "user_config": "cfg",
            "ports": [{"protocol": "tcp", "host_port": 2500, "vm_port": 80}],
            "kms_urls": ["https://kms.example:9201"], "app_id": "0xABCDEF",
        })
        assert response.status_code == 200, response.text
        vm_id = response.json()["id"]
        info = client.post("/prpc/GetInfo?json", json={"id": vm_id}).json()
    assert info["found"] is True
    assert info["info"]["status"] == "stopped"
    assert info["info"]["app_id"] == "abcdef"
    assert info["info"]["configuration"]["encrypted_env"] == "deadbeef"
    wd = daemon.workdir / "state" / "vm" / vm_id
    manifest = json.loads((wd / "vm-manifest.json").read_text())
    assert manifest["port_map"] == [{"address": "127.0.0.1", "protocol": "tcp", "from": 2500,
                                     "to": 80}]
    assert manifest["kms_urls"] == ["https://kms.example:9201"]
    assert (wd / "shared" / ".encrypted-env").read_bytes() == b"\xde\xad\xbe\xef"
    assert (wd / "shared" / ".user-config").read_text() == "cfg"
    assert json.loads((wd / "shared" / ".instance_info").read_text()) == {"app_id": "abcdef"}
    assert json.loads((wd / "vm-state.json").read_text()) == {"started": False}
    assert not (wd / "hda.img").exists()  # the disk is made at first start


@pytest.mark.parametrize("method", ["StartVm", "StopVm", "ShutdownVm", "RemoveVm"])
def test_unknown_vm_is_404(daemon: DaemonProcess, method: str) -> None:
    """Lifecycle calls on an unknown id are 404; an empty id is 400."""
    with daemon.client() as client:
        missing = client.post(f"/prpc/{method}?json", json={"id": "no-such-vm"})
        empty = client.post(f"/prpc/{method}?json", json={})
    assert missing.status_code == 404
    assert missing.json()["code"] == "VM_NOT_FOUND"
    assert "no-such-vm" in missing.json()["error"]
    assert empty.status_code == 400


def test_get_info_unknown_is_found_false(daemon: DaemonProcess) -> None:
    """GetInfo answers found=false (not an error) for an unknown id."""
    with daemon.client() as client:
        answer = client.post("/prpc/GetInfo?json", json={"id": "nope"}).json()
    assert answer == {"found": False, "info": None}


def test_shutdown_of_a_stopped_vm_is_a_conflict(daemon: DaemonProcess) -> None:
    """ShutdownVm on a VM that is not running says so with 409 and the state."""
    with daemon.client() as client:
        vm_id = client.post("/prpc/CreateVm?json", json=GOOD | {"name": "idle"}).json()["id"]
        response = client.post("/prpc/ShutdownVm?json", json={"id": vm_id})
    assert response.status_code == 409
    assert "not running (status: stopped)" in response.json()["error"]


def test_status_filters_pages_and_brief(daemon: DaemonProcess) -> None:
    """Status filters by ids and keyword, pages from 1 (0 = first page), and brief drops config."""
    with daemon.client() as client:
        ids = [client.post("/prpc/CreateVm?json", json=GOOD | {"name": f"page-{i}"}).json()["id"]
               for i in range(5)]
        everything = client.post("/prpc/Status?json", json={"keyword": "page-"}).json()
        assert everything["total"] == 5
        assert [vm["name"] for vm in everything["vms"]] == [f"page-{i}" for i in range(5)]
        assert everything["vms"][0]["configuration"]["name"] == "page-0"
        page1 = client.post("/prpc/Status?json", json={"keyword": "page-", "page": 1,
                                                        "page_size": 2, "brief": True}).json()
        page0 = client.post("/prpc/Status?json", json={"keyword": "page-", "page": 0,
                                                        "page_size": 2, "brief": True}).json()
        page3 = client.post("/prpc/Status?json", json={"keyword": "page-", "page": 3,
                                                        "page_size": 2}).json()
        by_id = client.post("/prpc/Status?json", json={"ids": ids[1:3]}).json()
    assert page1 == page0
    assert [vm["name"] for vm in page1["vms"]] == ["page-0", "page-1"]
    assert page1["total"] == 5
    assert page1["vms"][0]["configuration"] is None
    assert [vm["name"] for vm in page3["vms"]] == ["page-4"]
    assert {vm["id"] for vm in by_id["vms"]} == set(ids[1:3])
    assert by_id["port_mapping_enabled"] is True


def test_disk_size_at_the_image_root_minimum_is_accepted(daemon: DaemonProcess) -> None:
    """A disk of the image's root size rounded up to whole GiB is enough for CreateVm."""
    with daemon.client() as client:
        response = client.post("/prpc/CreateVm?json", json=GOOD | {
            "name": "rooted", "image": ROOTED_IMAGE, "disk_size": 2})
    assert response.status_code == 200, response.text


# -- the checks as pure functions ------------------------------------------------------------


def refusal(call: Callable[[], object]) -> InvalidField:
    with pytest.raises(InvalidField) as caught:
        call()
    return caught.value


# A host whose default bridge is br0: bridge NICs may leave bridge_name empty.
BRIDGED = replace(Config(), cvm=replace(Config().cvm, networking=NetworkingConfig(bridge="br0")))


@pytest.mark.parametrize("name", ["../../../etc", "..", ".", "a/b", "x" * 16, "br 0", "br:0", ""])
def test_check_networks_refuses_bad_bridge_names_before_looking(name: str) -> None:
    """A bridge name that is not an interface name is refused by the name rule, not by probing."""
    request = pb.VmConfiguration(networks=[pb.NetworkingConfig(mode="bridge", bridge_name=name)])
    if not name:  # empty means the configured bridge
        assert check_networks(BRIDGED, request)[0].bridge == ""
        return
    error = refusal(lambda: check_networks(BRIDGED, request))
    assert error.field == "networks[0].bridge_name"
    assert "no bridge" not in error.reason and "/sys" not in error.reason


def test_missing_and_non_bridge_interfaces_get_the_same_answer() -> None:
    """'lo' (an interface, not a bridge) and an unknown name give the same message shape."""
    def reason(name: str) -> str:
        request = pb.VmConfiguration(
            networks=[pb.NetworkingConfig(mode="bridge", bridge_name=name)])
        return refusal(lambda: check_networks(BRIDGED, request)).reason

    assert reason("lo") == "no bridge 'lo' on this host"
    assert reason("nosuchbr0") == "no bridge 'nosuchbr0' on this host"


def test_disk_size_must_hold_the_image_root_disk(tmp_path: Path) -> None:
    """The minimum disk_size is the image hda's virtual size in GiB, rounded up."""
    make_root_disk_image(tmp_path, "r1", size_mib=1024)
    make_root_disk_image(tmp_path, "r2", size_mib=1025)
    exact, over = load_image(tmp_path, "r1"), load_image(tmp_path, "r2")
    check_disk_fits_image(exact, 1)
    check_disk_fits_image(over, 2)
    error = refusal(lambda: check_disk_fits_image(over, 1))
    assert error.field == "disk_size"
    assert error.reason.startswith("must be at least 2 GiB for image 'r2'")
    error = refusal(lambda: check_disk_fits_image(over, 1, field="resize.disk_size"))
    assert error.field == "resize.disk_size"


def test_disk_check_refuses_an_hda_that_is_not_qcow2(tmp_path: Path) -> None:
    """hda.img is created with backing_fmt=qcow2, so a raw hda is refused naming the image."""
    make_root_disk_image(tmp_path, "raw", size_mib=1)
    (tmp_path / "raw" / "rootfs.qcow2").write_bytes(b"\0" * 4096)
    error = refusal(lambda: check_disk_fits_image(load_image(tmp_path, "raw"), 10))
    assert error.field == "image"
    assert "not a qcow2 image" in error.reason


def mapping_config(enabled: bool = True, address: str = "127.0.0.1") -> Config:
    config = Config()
    ranges = (PortRange("tcp", 2000, 3000),)
    mapping = PortMappingConfig(enabled=enabled, address=address, range=ranges)
    return replace(config, cvm=replace(config.cvm, port_mapping=mapping))


def test_check_ports_accepts_ipv4_and_fills_the_default_address() -> None:
    """Plain IPv4 literals are kept; an empty host_address takes cvm.port_mapping.address."""
    ports = [pb.PortMapping(protocol="tcp", host_port=2001, vm_port=80, host_address="0.0.0.0"),
             pb.PortMapping(protocol="tcp", host_port=2002, vm_port=81)]
    result = check_ports(mapping_config(), ports)
    assert [(p.address, p.host_port) for p in result] == [("0.0.0.0", 2001), ("127.0.0.1", 2002)]


@pytest.mark.parametrize("address", [
    "::1%x,guestfwd=tcp:10.0.2.100:1234-cmd:touch X", "::1", "fe80::1%eth0",
    "127.0.0.1,guestfwd=tcp:10.0.2.100:1-cmd:id", "127.0.0.1\n", " 127.0.0.1", "127.1",
    "localhost", "127.000.0.1",
])
def test_check_ports_refuses_anything_but_an_ipv4_literal(address: str) -> None:
    """host_address is a plain IPv4 literal: IPv6 (scope ids carry any text), names, option text."""
    port = pb.PortMapping(protocol="tcp", host_port=2001, vm_port=80, host_address=address)
    error = refusal(lambda: check_ports(mapping_config(), [port]))
    assert error.field == "ports[0].host_address"
    assert "is not an IPv4 address" in error.reason


def test_check_ports_refuses_a_non_ipv4_configured_default() -> None:
    """An empty host_address with an IPv6 cvm.port_mapping.address is refused, naming the key."""
    port = pb.PortMapping(protocol="tcp", host_port=2001, vm_port=80)
    error = refusal(lambda: check_ports(mapping_config(address="::1"), [port]))
    assert error.field == "ports[0].host_address"
    assert "cvm.port_mapping.address" in error.reason


def test_check_ports_policy_and_explicit_address_rule() -> None:
    """Disabled mapping and out-of-range ports are refused; require_address refuses empty ones."""
    port = pb.PortMapping(protocol="tcp", host_port=2001, vm_port=80, host_address="127.0.0.1")
    assert check_ports(mapping_config(enabled=False), []) == ()
    error = refusal(lambda: check_ports(mapping_config(enabled=False), [port]))
    assert (error.field, error.reason) == ("ports", "port mapping is disabled "
                                                    "(cvm.port_mapping.enabled)")
    far = pb.PortMapping(protocol="tcp", host_port=4000, vm_port=80, host_address="127.0.0.1")
    assert refusal(lambda: check_ports(mapping_config(), [far])).field == "ports[0].host_port"
    empty = pb.PortMapping(protocol="tcp", host_port=2001, vm_port=80)
    error = refusal(lambda: check_ports(mapping_config(), [port, empty], require_address=True))
    assert (error.field, error.reason) == ("ports[1].host_address", "Invalid host address: empty")
