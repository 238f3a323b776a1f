"""Capacity limits: vCPU and memory totals over every defined VM, the CID pool as the VM count."""

from __future__ import annotations

import json
import shutil
import uuid
from typing import Any

import httpx
import pytest

from tests.support.short_dirs import short_dir
from tests.support.vm_ops import (
    FAKE_IMAGE,
    call,
    create,
    error_of,
    idle_daemon,
    qemu_pid_of,
    rpc,
    status_of,
    wait_for,
)

LIMITS = "max_allocable_vcpu = 4\nmax_allocable_memory_in_mb = 512\ncid_pool_size = 4\n"


def resources(client: httpx.Client) -> dict[str, int]:
    data: dict[str, int] = rpc(client, "GetMeta")["resources"]
    return data


def assert_meta_matches_vms(client: httpx.Client) -> None:
    """GetMeta's used/free equal the sums over every VM Status lists, whatever its status."""
    vms = rpc(client, "Status")["vms"]
    meta = resources(client)
    vcpu = sum(vm["configuration"]["vcpu"] for vm in vms)
    memory = sum(vm["configuration"]["memory"] for vm in vms)
    assert (meta["used_cvm_number"], meta["used_vcpu"], meta["used_memory_in_mb"]) == \
        (len(vms), vcpu, memory)
    assert meta["free_vcpu"] == meta["max_allocable_vcpu"] - vcpu
    assert meta["free_memory_in_mb"] == meta["max_allocable_memory_in_mb"] - memory
    assert meta["free_cvm_number"] == meta["max_cvm_number"] - len(vms)


def try_create(client: httpx.Client, **fields: Any) -> httpx.Response:
    body = {"name": "x", "image": FAKE_IMAGE, "compose_file": json.dumps({"name": "x"}),
            "vcpu": 1, "memory": 64, "disk_size": 1, "stopped": True} | fields
    return call(client, "CreateVm", body)


@pytest.mark.qemu
def test_limits_refuse_then_accept_after_remove() -> None:
    """A VM over the vCPU/memory totals is refused with what is left; removing one makes room."""
    with short_dir("vmml") as workdir, idle_daemon(workdir, cvm=LIMITS) as daemon, \
            daemon.client() as client:
        running = create(client, vcpu=2, memory=256)  # boots (idle image)
        wait_for("QEMU", lambda: qemu_pid_of(workdir / "state" / "vm" / running))
        stopped = create(client, FAKE_IMAGE, vcpu=1, memory=128, stopped=True)
        assert_meta_matches_vms(client)
        meta = resources(client)
        assert (meta["used_vcpu"], meta["free_vcpu"]) == (3, 1)
        assert (meta["used_memory_in_mb"], meta["free_memory_in_mb"]) == (384, 128)

        # A stopped VM counts too: it may be started at any time.
        message = error_of(try_create(client, vcpu=2), 409)
        assert message == "not enough vCPUs: 2 requested, 1 of 4 left (cvm.max_allocable_vcpu)"
        message = error_of(try_create(client, memory=256), 409)
        assert message == ("not enough memory: 256 MB requested, 128 of 512 MB left "
                           "(cvm.max_allocable_memory_in_mb)")
        assert rpc(client, "Status")["total"] == 2

        # Resizing is checked against the others the same way.
        message = error_of(call(client, "ResizeVm", {"id": stopped, "vcpu": 3}), 409)
        assert "not enough vCPUs: 3 requested, 2 of 4 left" in message

        rpc(client, "RemoveVm", {"id": running})
        wait_for("the removal", lambda: status_of(client, running) == "gone")
        created = rpc(client, "CreateVm", {
            "name": "x", "image": FAKE_IMAGE, "compose_file": json.dumps({"name": "x"}),
            "vcpu": 2, "memory": 256, "disk_size": 1, "stopped": True})["id"]
        rpc(client, "ResizeVm", {"id": stopped, "vcpu": 2})
        assert_meta_matches_vms(client)
        meta = resources(client)
        assert (meta["used_vcpu"], meta["free_vcpu"], meta["used_cvm_number"]) == (4, 0, 2)
        assert created


def test_cid_pool_caps_the_vm_count() -> None:
    """The CID pool is the VM count: the fifth VM of a pool of four is refused."""
    with short_dir("vmml") as workdir, idle_daemon(
            workdir, cvm="max_allocable_vcpu = 100\ncid_pool_size = 4\n") as daemon, \
            daemon.client() as client:
        for _ in range(4):
            assert try_create(client).status_code == 200
        message = error_of(try_create(client), 409)
        assert "CID pool exhausted" in message
        assert resources(client)["free_cvm_number"] == 0


@pytest.mark.qemu
def test_start_refused_when_over_committed() -> None:
    """A directory dropped in beyond the limits loads on ReloadVms, but will not start."""
    with short_dir("vmml") as workdir, idle_daemon(workdir, cvm=LIMITS) as daemon, \
            daemon.client() as client:
        original = create(client, vcpu=3, memory=64, stopped=True)
        run = workdir / "state" / "vm"
        copy_id = str(uuid.uuid4())
        shutil.copytree(run / original, run / copy_id)
        manifest = json.loads((run / copy_id / "vm-manifest.json").read_text())
        (run / copy_id / "vm-manifest.json").write_text(json.dumps(manifest | {"id": copy_id}))
        assert rpc(client, "ReloadVms") == {"loaded": 1, "updated": 0, "removed": 0}
        meta = resources(client)
        assert (meta["used_vcpu"], meta["free_vcpu"]) == (6, 0)  # free never goes negative
        message = error_of(call(client, "StartVm", {"id": copy_id}), 409)
        assert message == "not enough vCPUs: 3 requested, 1 of 4 left (cvm.max_allocable_vcpu)"
        assert status_of(client, copy_id) == "stopped"
        rpc(client, "RemoveVm", {"id": original})
        wait_for("the removal", lambda: status_of(client, original) == "gone")
        rpc(client, "StartVm", {"id": copy_id})
        wait_for("QEMU", lambda: qemu_pid_of(run / copy_id))
        assert status_of(client, copy_id) == "running"
