"""UpdateVm / UpgradeApp / ResizeVm: validation, what is written, and what the next boot sees."""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from guest_agent import BOOT_MARKER
from tests.support.daemon_proc import DaemonProcess, start_daemon
from tests.support.guest_image import ensure_guest_image
from tests.support.root_disk_image import ROOTED_IMAGE, make_root_disk_image
from tests.support.short_dirs import short_dir
from tests.support.vm_ops import (
    FAKE_IMAGE,
    call,
    compose,
    create,
    error_of,
    events,
    prepare_images,
    qemu_argv,
    qemu_pid_of,
    rpc,
    status_of,
    vm_info,
    wait_for,
)
from vmm.core.config import Config, ImageConfig, PortMappingConfig, PortRange
from vmm.core.exceptions import InvalidField
from vmm.model.manifest import Manifest, PortMap
from vmm.model.vm import Vm
from vmm.model.workdir import SharedFiles, Workdir, create_workdir
from vmm.rpc import vmm_rpc_pb2 as pb
from vmm.vms.update import JOURNAL, UpdateRequest, finish_pending, plan, stage_update, write_update


@pytest.fixture(scope="module")
def daemon() -> Iterator[DaemonProcess]:
    """Placeholder images, port mapping on for tcp 40000-41000 (UpdateVm applies that policy)."""
    with short_dir("vmmu") as workdir:
        prepare_images(workdir)
        proc = start_daemon(workdir, extra_config=(
            '[cvm]\naccel = "tcg"\nmax_allocable_vcpu = 8\nmax_allocable_memory_in_mb = 8192\n'
            "max_disk_size_gb = 100\n"
            '[cvm.port_mapping]\nenabled = true\n'
            'range = [{protocol = "tcp", from = 40000, to = 41000}]\n'
        ))
        try:
            yield proc
        finally:
            proc.destroy()


def stopped_vm(client: httpx.Client, **fields: object) -> str:
    return create(client, FAKE_IMAGE, stopped=True, **fields)


def vm_dir(daemon: DaemonProcess, vm_id: str) -> Path:
    return daemon.workdir / "state" / "vm" / vm_id


def manifest(daemon: DaemonProcess, vm_id: str) -> dict[str, object]:
    data: dict[str, object] = json.loads((vm_dir(daemon, vm_id) / "vm-manifest.json").read_text())
    return data


def test_update_compose_returns_new_app_id_keeps_vm_app_id(daemon: DaemonProcess) -> None:
    """A changed compose returns sha256(compose)[:40]; the VM's app_id stays; same compose → ""."""
    with daemon.client() as client:
        vm_id = stopped_vm(client)
        before = vm_info(client, vm_id)["app_id"]
        new = compose("v2")
        answer = rpc(client, "UpdateVm", {"id": vm_id, "compose_file": new})
        assert answer["id"] == hashlib.sha256(new.encode()).hexdigest()[:40]
        assert (vm_dir(daemon, vm_id) / "shared" / "app-compose.json").read_text() == new
        info = vm_info(client, vm_id)
        assert info["app_id"] == before == manifest(daemon, vm_id)["app_id"]
        assert info["configuration"]["compose_file"] == new
        assert ("vmm.updated", "compose") in events(info)
        assert rpc(client, "UpdateVm", {"id": vm_id, "compose_file": new})["id"] == ""
        # UpgradeApp is the same call under its old name.
        newer = compose("v3")
        answer = rpc(client, "UpgradeApp", {"id": vm_id, "compose_file": newer})
        assert answer["id"] == hashlib.sha256(newer.encode()).hexdigest()[:40]
        assert info["status"] == "stopped"


def test_update_rejects_bad_compose_and_unknown_vm(daemon: DaemonProcess) -> None:
    """An unparsable compose is a 400 naming compose_file; an unknown VM is a 404."""
    with daemon.client() as client:
        vm_id = stopped_vm(client)
        message = error_of(call(client, "UpdateVm", {"id": vm_id, "compose_file": "{nope"}), 400)
        assert "compose_file" in message
        assert "not found" in error_of(
            call(client, "UpdateVm", {"id": "no-such-vm", "compose_file": compose("x")}), 404)
        assert "`id`" in error_of(call(client, "UpdateVm", {"compose_file": compose("x")}), 400)


def test_update_env_and_user_config_only_when_non_empty(daemon: DaemonProcess) -> None:
    """encrypted_env and user_config are replaced when given and kept when empty."""
    with daemon.client() as client:
        vm_id = stopped_vm(client, encrypted_env="0102", user_config="first")
        shared = vm_dir(daemon, vm_id) / "shared"
        rpc(client, "UpdateVm", {"id": vm_id, "encrypted_env": "c0ffee", "user_config": "second"})
        assert (shared / ".encrypted-env").read_bytes() == bytes.fromhex("c0ffee")
        assert (shared / ".user-config").read_text() == "second"
        rpc(client, "UpdateVm", {"id": vm_id, "encrypted_env": "", "user_config": ""})
        assert (shared / ".encrypted-env").read_bytes() == bytes.fromhex("c0ffee")
        assert (shared / ".user-config").read_text() == "second"
        info = vm_info(client, vm_id)
        assert info["configuration"]["encrypted_env"] == "c0ffee"
        assert ("vmm.updated", "encrypted_env, user_config") in events(info)


def test_update_ports_replace_with_policy_and_conflicts(daemon: DaemonProcess) -> None:
    """Ports are replaced under CreateVm's policy; clashes, bad and empty addresses are refused."""
    with daemon.client() as client:
        first, second = stopped_vm(client), stopped_vm(client)
        port = {"protocol": "tcp", "host_port": 40123, "vm_port": 80, "host_address": "127.0.0.1"}
        rpc(client, "UpdateVm", {"id": first, "update_ports": True, "ports": [port]})
        assert manifest(daemon, first)["port_map"] == [
            {"address": "127.0.0.1", "protocol": "tcp", "from": 40123, "to": 80}]
        clash = port | {"host_address": "0.0.0.0", "vm_port": 81}
        message = error_of(call(client, "UpdateVm",
                                {"id": second, "update_ports": True, "ports": [clash]}), 409)
        assert first in message and "ports[0]" in message
        message = error_of(call(client, "UpdateVm", {
            "id": second, "update_ports": True,
            "ports": [port | {"host_port": 40124}, port | {"host_port": 40125, "host_address": ""}],
        }), 400)
        assert "`ports[1].host_address`" in message and "Invalid host address" in message
        message = error_of(call(client, "UpdateVm", {
            "id": second, "update_ports": True, "ports": [port | {"host_port": 2000}]}), 400)
        assert "`ports[0].host_port`" in message and "not allowed for tcp:2000" in message
        message = error_of(call(client, "UpdateVm", {
            "id": second, "update_ports": True,
            "ports": [port | {"host_address": "::1%x,guestfwd=tcp:10.0.2.100:1234-cmd:touch X"}],
        }), 400)
        assert "`ports[0].host_address`" in message and "is not an IPv4 address" in message
        assert manifest(daemon, second)["port_map"] == []
        # An empty list clears the mappings; the freed port can then be taken by another VM.
        rpc(client, "UpdateVm", {"id": first, "update_ports": True, "ports": []})
        assert manifest(daemon, first)["port_map"] == []
        rpc(client, "UpdateVm", {"id": second, "update_ports": True, "ports": [clash]})


def test_update_urls_gpus_and_no_tee(daemon: DaemonProcess) -> None:
    """KMS/gateway URL lists replace (empty = node default), no_tee applies, bad values are 400."""
    with daemon.client() as client:
        vm_id = stopped_vm(client, kms_urls=["http://kms.one:8000"])
        rpc(client, "UpdateVm", {"id": vm_id, "update_kms_urls": True, "kms_urls": [],
                                 "update_gateway_urls": True,
                                 "gateway_urls": ["https://gw.example:443"], "no_tee": True})
        data = manifest(daemon, vm_id)
        assert data["kms_urls"] == []
        assert data["gateway_urls"] == ["https://gw.example:443"]
        assert data["no_tee"] is True
        # Without update_kms_urls the list is left alone even if one is sent.
        rpc(client, "UpdateVm", {"id": vm_id, "kms_urls": ["http://ignored.example"]})
        assert manifest(daemon, vm_id)["kms_urls"] == []
        message = error_of(call(client, "UpdateVm", {
            "id": vm_id, "update_kms_urls": True, "kms_urls": ["ftp://x"]}), 400)
        assert "`kms_urls[0]`" in message
        message = error_of(call(client, "UpdateVm", {
            "id": vm_id, "gpus": {"attach_mode": "all"}}), 400)
        assert "GPU passthrough is not enabled" in message
        info = vm_info(client, vm_id)
        assert info["configuration"]["no_tee"] is True
        assert ("vmm.updated", "kms_urls, gateway_urls, no_tee") in events(info)


def test_resize_validation(daemon: DaemonProcess) -> None:
    """ResizeVm needs a field, values > 0, a known image, and never shrinks the disk."""
    with daemon.client() as client:
        vm_id = stopped_vm(client, disk_size=4)
        cases: list[tuple[dict[str, object], int, str]] = [
            ({}, 400, "resize request contains no updates"),
            ({"vcpu": 0}, 400, "`vcpu`: must be > 0"),
            ({"memory": 0}, 400, "`memory`: must be > 0"),
            ({"disk_size": 0}, 400, "`disk_size`: must be > 0"),
            ({"image": ""}, 400, "`image`: must not be empty"),
            ({"image": "no-such-image"}, 400, "no image named 'no-such-image'"),
            ({"disk_size": 2}, 400, "cannot shrink disk from 4 GB to 2 GB"),
            ({"vcpu": 9}, 400, "`vcpu`: must be 1..8"),
        ]
        for fields, status, text in cases:
            message = error_of(call(client, "ResizeVm", {"id": vm_id} | fields), status)
            assert text in message, (fields, message)
        assert "not found" in error_of(call(client, "ResizeVm", {"id": "nope", "vcpu": 1}), 404)
        before = manifest(daemon, vm_id)
        assert (before["vcpu"], before["memory"], before["disk_size"]) == (1, 64, 4)

        assert rpc(client, "ResizeVm", {"id": vm_id, "vcpu": 2, "memory": 256, "disk_size": 6,
                                        "image": "dstack-0.5.3"}) is None
        after = manifest(daemon, vm_id)
        assert (after["vcpu"], after["memory"], after["disk_size"], after["image"]) == \
            (2, 256, 6, "dstack-0.5.3")
        info = vm_info(client, vm_id)
        assert info["image_version"] == "0.5.3"
        assert ("vmm.resized", "vcpu 1 -> 2, memory 64 MB -> 256 MB, disk_size 4 GB -> 6 GB, "
                "image dstack-dev-0.5.4 -> dstack-0.5.3") in events(info)
        # The same values again change nothing and record nothing.
        rpc(client, "ResizeVm", {"id": vm_id, "vcpu": 2})
        assert [e for e, _ in events(vm_info(client, vm_id))].count("vmm.resized") == 1


def test_update_journal_rolls_forward(tmp_path: Path) -> None:
    """An update interrupted after its journal is finished at load: all new files, no journal."""
    old = Manifest(id="vm-1", name="a", app_id="ab" * 20, image="img", vcpu=1, memory=64,
                   disk_size=1, created_at_ms=1)
    wd = create_workdir(tmp_path, old, SharedFiles(compose="{}"), started=False)
    new = old.evolve(vcpu=2, port_map=(PortMap("tcp", 2000, 80, "127.0.0.1"),))
    write_update(wd, new, SharedFiles(compose='{"v": 2}', encrypted_env=b"\x01", user_config="u"))
    assert not (wd.path / JOURNAL).exists()
    assert wd.read_manifest() == new

    # A crash right after the commit: files still old, journal present; finished at load.
    staged = stage_update(wd, old.evolve(vcpu=3), SharedFiles(compose='{"v": 3}'))
    staged.write_journal()
    assert wd.read_manifest() == new
    assert finish_pending(Workdir(wd.path)) is True
    assert wd.read_manifest() == old.evolve(vcpu=3)
    assert wd.read_shared() == SharedFiles(compose='{"v": 3}')  # env and user config removed
    assert sorted(p.name for p in wd.path.rglob(".*")) == [".instance_info"]
    assert finish_pending(Workdir(wd.path)) is False
    # A journal damaged from outside is dropped, leaving the complete previous version.
    (wd.path / JOURNAL).write_text("{torn")
    assert finish_pending(Workdir(wd.path)) is False
    assert wd.read_manifest().vcpu == 3


# -- plan() as a pure function ----------------------------------------------------------------


def plan_config(images: Path, *, mapping: bool) -> Config:
    config = replace(Config(), image=ImageConfig(path=str(images)))
    ports = PortMappingConfig(enabled=mapping, range=(PortRange("tcp", 40000, 41000),))
    return replace(config, cvm=replace(config.cvm, port_mapping=ports, max_disk_size_gb=100))


def stopped(tmp_path: Path, image: str, disk_size: int) -> Vm:
    manifest = Manifest(id="vm-1", name="a", app_id="ab" * 20, image=image, vcpu=1, memory=64,
                        disk_size=disk_size, created_at_ms=1)
    return Vm(workdir=Workdir(tmp_path / "vm-1"), manifest=manifest,
              shared=SharedFiles(compose="{}"), started=False, cid=3)


def refused(config: Config, vm: Vm, req: UpdateRequest) -> InvalidField:
    with pytest.raises(InvalidField) as caught:
        plan(config, vm, req)
    return caught.value


def test_plan_applies_the_port_policy_of_create_vm(tmp_path: Path) -> None:
    """update_ports: disabled mapping, out-of-range ports and non-IPv4 addresses are refused."""
    vm = stopped(tmp_path, FAKE_IMAGE, 1)
    good = pb.PortMapping(protocol="tcp", host_port=40001, vm_port=80, host_address="127.0.0.1")
    enabled, disabled = plan_config(tmp_path, mapping=True), plan_config(tmp_path, mapping=False)
    assert plan(enabled, vm, UpdateRequest(id=vm.id, ports=(good,))).manifest.port_map == (
        PortMap("tcp", 40001, 80, "127.0.0.1"),)
    error = refused(disabled, vm, UpdateRequest(id=vm.id, ports=(good,)))
    assert (error.field, error.reason) == ("ports", "port mapping is disabled "
                                                    "(cvm.port_mapping.enabled)")
    assert plan(disabled, vm, UpdateRequest(id=vm.id, ports=())).changed == ()
    far = pb.PortMapping(protocol="tcp", host_port=80, vm_port=80, host_address="127.0.0.1")
    assert refused(enabled, vm, UpdateRequest(id=vm.id, ports=(far,))).field == \
        "ports[0].host_port"
    evil = pb.PortMapping(protocol="tcp", host_port=40001, vm_port=80,
                          host_address="::1%x,guestfwd=tcp:10.0.2.100:1234-cmd:touch X")
    for config in (enabled, disabled):
        assert refused(config, vm, UpdateRequest(id=vm.id, ports=(evil,))).field == \
            "ports[0].host_address"


def test_plan_refuses_a_disk_below_the_image_root(tmp_path: Path) -> None:
    """Growing the disk or changing the image needs disk_size >= the image's root disk."""
    images = tmp_path / "images"
    make_root_disk_image(images, ROOTED_IMAGE, size_mib=2560)  # needs 3 GiB
    make_root_disk_image(images, "small-0.5.0", size_mib=512)
    config = plan_config(images, mapping=False)
    legacy = stopped(tmp_path, ROOTED_IMAGE, 1)  # created before the check existed
    assert plan(config, legacy, UpdateRequest(id=legacy.id, vcpu=2)).resized == ("vcpu 1 -> 2",)
    error = refused(config, legacy, UpdateRequest(id=legacy.id, disk_size=2))
    assert error.field == "disk_size"
    assert error.reason.startswith(f"must be at least 3 GiB for image '{ROOTED_IMAGE}', whose root")
    assert plan(config, legacy, UpdateRequest(id=legacy.id, disk_size=3)).grow_disk
    small = stopped(tmp_path, "small-0.5.0", 1)
    error = refused(config, small, UpdateRequest(id=small.id, image=ROOTED_IMAGE))
    assert error.field == "disk_size" and "at least 3 GiB" in error.reason
    assert plan(config, small, UpdateRequest(id=small.id, image=ROOTED_IMAGE, disk_size=3)).resized
    gone = stopped(tmp_path, "deleted-0.5.0", 1)  # its image is gone: StartVm reports that
    assert plan(config, gone, UpdateRequest(id=gone.id, disk_size=2)).grow_disk


def test_update_journal_replay_is_idempotent_and_leftovers_go(tmp_path: Path) -> None:
    """A crash mid-install is finished; staged files without a journal are dropped, not applied."""
    old = Manifest(id="vm-1", name="a", app_id="ab" * 20, image="img", vcpu=1, memory=64,
                   disk_size=1, created_at_ms=1)
    wd = create_workdir(tmp_path, old, SharedFiles(compose="{}"), started=False)
    staged = stage_update(wd, old.evolve(vcpu=2), SharedFiles(compose='{"v": 2}', user_config="u"))
    assert staged.install == ("shared/app-compose.json", "shared/.user-config", "vm-manifest.json")
    staged.write_journal()
    (wd.shared / ".app-compose.json.update").replace(wd.compose)  # installed before the crash
    assert finish_pending(wd) is True
    assert (wd.read_manifest().vcpu, wd.read_shared()) == \
        (2, SharedFiles(compose='{"v": 2}', user_config="u"))

    # Staged but never committed (a crash before the journal): the old version stays.
    stage_update(wd, old.evolve(vcpu=5), SharedFiles(compose='{"v": 5}'))
    assert finish_pending(wd) is False
    assert (wd.read_manifest().vcpu, wd.read_shared().compose) == (2, '{"v": 2}')
    assert sorted(p.name for p in wd.path.rglob(".*")) == [".instance_info", ".user-config"]

    # A journal naming a file an update never writes is refused, not followed.
    (tmp_path / "victim").write_text("keep")
    (wd.path / ".victim.update").write_text("overwritten")
    journals: list[dict[str, object]] = [{"install": ["../victim"], "remove": []},
                                         {"install": [["vm-manifest.json"]], "remove": []},
                                         {"install": []}]
    for journal in journals:
        (wd.path / JOURNAL).write_text(json.dumps(journal))
        assert finish_pending(wd) is False
        assert (tmp_path / "victim").read_text() == "keep"
        assert not (wd.path / JOURNAL).exists()


# -- real QEMU, development image -------------------------------------------------------------


def serial(client: httpx.Client, vm_id: str) -> str:
    response = client.get("/logs", params={"id": vm_id, "lines": 2000})
    assert response.status_code == 200, response.text
    return response.text


def virtual_size(disk: Path) -> int:
    out = subprocess.run(["qemu-img", "info", "--force-share", "--output=json", str(disk)],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    size: int = json.loads(out)["virtual-size"]
    return size


@pytest.mark.qemu
def test_update_and_resize_apply_at_next_boot() -> None:
    """UpdateVm leaves a running guest alone; after stop + resize the next boot has it all."""
    image = ensure_guest_image()
    first, second = compose("first"), compose("second")
    with short_dir("vmmq") as workdir:
        daemon = start_daemon(workdir, extra_config=(
            f'[image]\npath = "{image.parent}"\n[cvm]\naccel = "tcg"\n'))
        try:
            with daemon.client() as client:
                vm_id = create(client, image.name, compose_file=first, vcpu=1, memory=512,
                               disk_size=2)
                directory = workdir / "state" / "vm" / vm_id
                line = f"compose-sha256={hashlib.sha256(first.encode()).hexdigest()}"
                wait_for("the first boot", lambda: BOOT_MARKER in serial(client, vm_id), 120)
                assert line in serial(client, vm_id)
                pid = qemu_pid_of(directory)
                assert pid is not None
                assert "-smp" in qemu_argv(pid)
                assert virtual_size(directory / "hda.img") == 2 * 1024**3

                answer = rpc(client, "UpdateVm", {"id": vm_id, "compose_file": second})
                assert answer["id"] == hashlib.sha256(second.encode()).hexdigest()[:40]
                assert qemu_pid_of(directory) == pid  # nothing restarted
                assert status_of(client, vm_id) == "running"

                message = error_of(call(client, "ResizeVm", {"id": vm_id, "vcpu": 2}), 409)
                assert message == f"VM {vm_id} must be stopped before resizing (status: running)"

                rpc(client, "StopVm", {"id": vm_id})
                rpc(client, "ResizeVm", {"id": vm_id, "vcpu": 2, "memory": 768, "disk_size": 4})
                assert virtual_size(directory / "hda.img") == 4 * 1024**3

                rpc(client, "StartVm", {"id": vm_id})
                wait_for("the second boot", lambda: BOOT_MARKER in serial(client, vm_id), 120)
                log = serial(client, vm_id)
                assert f"compose-sha256={hashlib.sha256(second.encode()).hexdigest()}" in log
                assert line not in log  # the live log holds this boot only
                pid = qemu_pid_of(directory)
                assert pid is not None
                argv = qemu_argv(pid)
                assert argv[argv.index("-smp") + 1] == "2"
                assert argv[argv.index("-m") + 1] == "768M"
        finally:
            daemon.destroy()
