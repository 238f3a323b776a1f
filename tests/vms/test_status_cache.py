"""The Status cache: encodings equal to a fresh encoding, and versions that cannot be forgotten."""

from __future__ import annotations

import json
from pathlib import Path

from vmm.model.manifest import Manifest, PortMap
from vmm.model.runtime import Runtime
from vmm.model.vm import Vm
from vmm.model.workdir import SharedFiles, Workdir
from vmm.prpc import codec
from vmm.rpc import vmm_rpc_pb2 as pb
from vmm.vms.status_cache import StatusCache


def plain_info(vm: Vm, brief: bool, guest_channel: str, now: float) -> pb.VmInfo:
    """What the cache encodes: here the VM record alone (the manager adds its NICs)."""
    return vm.info(brief=brief, guest_channel=guest_channel, now=now)


def make_vm(tmp_path: Path, n: int) -> Vm:
    manifest = Manifest(id=f"vm-{n}", name=f"name-\"{n}\"", app_id="ab" * 20, image="img",
                        vcpu=1, memory=64, disk_size=1, created_at_ms=n,
                        port_map=(PortMap(protocol="tcp", address="127.0.0.1", host_port=8000 + n,
                                          vm_port=80),))
    return Vm(workdir=Workdir(tmp_path / f"vm-{n}"), manifest=manifest,
              shared=SharedFiles(compose='{"x": "\u00e9"}', encrypted_env=b"\x01"),
              started=bool(n % 2), cid=3 + n)


def fresh(vms: list[Vm], brief: bool) -> pb.StatusResponse:
    return pb.StatusResponse(vms=[vm.info(brief=brief, guest_channel="vsock") for vm in vms],
                             port_mapping_enabled=True, total=len(vms))


def encoded(cache: StatusCache, vms: list[Vm], brief: bool) -> codec.Encoded:
    def select(request: pb.StatusRequest) -> tuple[list[Vm], int]:
        return vms, len(vms)
    return cache.response(pb.StatusRequest(brief=brief, ids=[vm.id for vm in vms]), select,
                          guest_channel="vsock", port_mapping_enabled=True)


def test_cached_encodings_equal_fresh_ones(tmp_path: Path) -> None:
    """JSON and protobuf from cached parts decode to what a fresh encoding gives, twice over."""
    vms = [make_vm(tmp_path, n) for n in range(3)]
    vms[1].runtime = Runtime(status="running", pid=1, started_at=1.0)
    vms[1].add_event("vmm.started", "pid 1")
    registry = {vm.id: vm for vm in vms}
    cache = StatusCache(registry, plain_info)
    for brief in (True, False):
        for _ in range(2):  # the second round comes from the cache
            reply = encoded(cache, vms, brief)
            assert json.loads(reply.json()) == json.loads(codec.to_json_bytes(fresh(vms, brief)))
            assert pb.StatusResponse.FromString(reply.protobuf()) == fresh(vms, brief)


def test_every_assignment_that_changes_a_field_bumps_the_version(tmp_path: Path) -> None:
    """Any writer's assignment or event changes the version; an equal assignment keeps it."""
    vm = make_vm(tmp_path, 1)
    before = vm.version
    vm.runtime = None  # equal to what it was
    assert vm.version == before
    vm.boot_progress = "booting"
    assert vm.version > before
    before = vm.version
    vm.runtime = Runtime(status="stopped")
    assert vm.version > before
    before = vm.version
    vm.add_event("guest.x")
    assert vm.version > before


def test_a_change_is_seen_by_the_next_status(tmp_path: Path) -> None:
    """A field set after a cached Status shows in the next one (JSON and protobuf)."""
    vms = [make_vm(tmp_path, 1)]
    cache = StatusCache({vms[0].id: vms[0]}, plain_info)
    encoded(cache, vms, True).json()
    encoded(cache, vms, True).protobuf()
    vms[0].boot_progress = "booting"
    reply = encoded(cache, vms, True)
    assert json.loads(reply.json())["vms"][0]["boot_progress"] == "booting"
    assert pb.StatusResponse.FromString(reply.protobuf()).vms[0].boot_progress == "booting"


def test_parts_of_removed_vms_are_dropped(tmp_path: Path) -> None:
    """Entries of VMs no longer registered do not accumulate."""
    registry: dict[str, Vm] = {}
    cache = StatusCache(registry, plain_info)
    for n in range(200):
        vm = make_vm(tmp_path, n)
        registry[vm.id] = vm
        encoded(cache, [vm], True).json()
        del registry[vm.id]
    assert len(cache) <= 65


def test_a_reply_with_a_running_vm_is_rebuilt_when_its_uptime_ages(tmp_path: Path) -> None:
    """The whole cached reply lasts only until an uptime string in it would change."""
    vm = make_vm(tmp_path, 1)
    vm.runtime = Runtime(status="running", pid=1, started_at=1000.25)
    assert vm.clock_valid_until(1005.5) == 1006.25
    assert vm.clock_valid_until(1006.25) == 1007.25
    vm.runtime = Runtime(status="exited", started_at=1000.0, stopped_at=2000.5)
    assert vm.clock_valid_until(2000.0) == 2001.5  # before the stop: "0s" until a second passed
    vm.runtime = None
    assert vm.clock_valid_until(5.0) == float("inf")


def test_a_removed_vm_leaves_the_cached_reply(tmp_path: Path) -> None:
    """Dropping a VM from the registry (no VM field changes) still rebuilds the reply."""
    vms = [make_vm(tmp_path, n) for n in range(3)]
    registry = {vm.id: vm for vm in vms}
    cache = StatusCache(registry, plain_info)

    def select(request: pb.StatusRequest) -> tuple[list[Vm], int]:
        return list(registry.values()), len(registry)
    request = pb.StatusRequest(brief=True)
    first = cache.response(request, select, guest_channel="", port_mapping_enabled=False)
    assert first is cache.response(request, select, guest_channel="", port_mapping_enabled=False)
    del registry[vms[0].id]
    reply = cache.response(request, select, guest_channel="", port_mapping_enabled=False)
    assert [vm["id"] for vm in json.loads(reply.json())["vms"]] == [vms[1].id, vms[2].id]
