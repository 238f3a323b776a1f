"""The daemon on the libvirt backend, without booting: what GetMeta says, what it refuses."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.daemon_proc import DaemonProcess, start_daemon
from tests.support.libvirtd import Libvirtd
from tests.support.short_dirs import short_dir
from tests.support.vm_ops import COMPOSE, FAKE_IMAGE, call, create, error_of, prepare_images, rpc


@pytest.fixture(scope="module")
def daemon(libvirtd: Libvirtd) -> Iterator[tuple[DaemonProcess, Path]]:
    """A daemon on the libvirt backend whose config asks for what libvirt cannot do (cvm.user)."""
    with short_dir("lvdd") as workdir:
        prepare_images(workdir)
        proc = start_daemon(workdir, extra_config=(
            f'[cvm]\naccel = "tcg"\nbackend = "libvirt"\nuser = "root"\n'
            f'[libvirt]\nuri = "{libvirtd.uri}"\n'
        ))
        try:
            yield proc, workdir / "state" / "vm"
        finally:
            proc.destroy()


def test_get_meta_names_the_backend_and_what_it_refuses(daemon: tuple[DaemonProcess, Path]) -> None:
    """GetMeta: backend libvirt, its version, its features, and TDX among what it refuses."""
    with daemon[0].client() as client:
        host = rpc(client, "GetMeta")["host"]
    assert host["backend"] == "libvirt"
    assert host["backend_version"].startswith("libvirt 9.")
    assert "serial-channel" in host["backend_features"]
    assert any(item.startswith("TDX:") for item in host["backend_unsupported"])


def test_supervisor_rpcs_belong_to_the_qemu_backend(daemon: tuple[DaemonProcess, Path]) -> None:
    """SvList/SvStop/SvRemove under libvirt: 409 saying the supervisor is the QEMU backend's."""
    with daemon[0].client() as client:
        for method, body in (("SvList", {}), ("SvStop", {"id": "x"}), ("SvRemove", {"id": "x"})):
            message = error_of(call(client, method, body), 409)
            assert "QEMU backend" in message and "libvirt" in message


def test_unsupported_start_is_refused_and_changes_nothing(
    daemon: tuple[DaemonProcess, Path],
) -> None:
    """CreateVm/StartVm of a VM libvirt cannot run: 409 UNSUPPORTED naming feature and backend,
    no directory left by CreateVm, vm-state.json untouched by StartVm."""
    proc, run = daemon
    with proc.client() as client:
        response = call(client, "CreateVm", {
            "name": "refused", "image": FAKE_IMAGE, "compose_file": COMPOSE, "vcpu": 1,
            "memory": 64, "disk_size": 1})
        message = error_of(response, 409)
        assert response.json()["code"] == "UNSUPPORTED"
        assert "cvm.user" in message and "libvirt backend" in message
        assert rpc(client, "Status")["total"] == 0
        assert sorted(p.name for p in run.iterdir()) == []

        vm_id = create(client, FAKE_IMAGE, stopped=True)
        state = (run / vm_id / "vm-state.json").read_bytes()
        message = error_of(call(client, "StartVm", {"id": vm_id}), 409)
        assert "cvm.user" in message
        assert (run / vm_id / "vm-state.json").read_bytes() == state
        assert json.loads(state) == {"started": False}
        assert rpc(client, "GetInfo", {"id": vm_id})["info"]["status"] == "stopped"
