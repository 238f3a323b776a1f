"""A full filesystem under the VM directories: CreateVm and UpdateVm answer 507 and change nothing.

The daemon runs in its own mount namespace (``unshare -m``) with a 2 MiB tmpfs over its
``run_path``, so the mount goes away with the daemon's processes and the host is never changed;
the test reaches that filesystem through ``/proc/<daemon pid>/root``. tmpfs counts space in whole
pages, so a test can leave exactly N pages free.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.daemon_proc import DaemonProcess, start_daemon
from tests.support.short_dirs import short_dir
from tests.support.vm_ops import FAKE_IMAGE, call, create, prepare_images, rpc, vm_info
from vmm.core.exceptions import InsufficientStorage, StorageError
from vmm.vms.update import JOURNAL

PAGE = 4096
TMPFS_BYTES = 2 * 1024 * 1024
FILLER = ".test-filler"
NO_SPACE = "No space left on device"


@dataclass(frozen=True)
class SmallDisk:
    """The daemon's run_path, a tmpfs only the daemon's mount namespace sees."""

    root: Path

    def free_pages(self) -> int:
        return os.statvfs(self.root).f_bavail

    def fill(self, leave_pages: int = 0) -> None:
        """Fill the filesystem to the brim, then give back exactly ``leave_pages`` pages."""
        filler = self.root / FILLER
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            while True:
                os.write(fd, b"\0" * 65536)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
        finally:
            os.close(fd)
        pages = -(-filler.stat().st_size // PAGE)
        os.truncate(filler, max(0, pages - leave_pages) * PAGE)
        assert self.free_pages() == leave_pages

    def free(self) -> None:
        (self.root / FILLER).unlink(missing_ok=True)

    def entries(self) -> set[str]:
        return {p.name for p in self.root.iterdir()} - {FILLER}


@pytest.fixture(scope="module")
def daemon() -> Iterator[DaemonProcess]:
    """One daemon whose run_path is a private 2 MiB tmpfs (placeholder images, VMs stay stopped)."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("mounting a tmpfs in a private mount namespace needs root and unshare")
    with short_dir("vmmf") as workdir:
        prepare_images(workdir)
        run_path = workdir / "state" / "vm"
        run_path.mkdir(parents=True)
        mount_then_exec = 'mount -t tmpfs -o size=2m,mode=0755 vmm-test-full "$0" && exec "$@"'
        proc = start_daemon(
            workdir, extra_config='[cvm]\naccel = "tcg"\n',
            wrap=["unshare", "--mount", "--propagation", "private", "--",
                  "sh", "-c", mount_then_exec, str(run_path)],
        )
        try:
            yield proc
        finally:
            proc.destroy()


@pytest.fixture
def disk(daemon: DaemonProcess) -> Iterator[SmallDisk]:
    small = SmallDisk(Path(f"/proc/{daemon.pid}/root{daemon.workdir}/state/vm"))
    stat = os.statvfs(small.root)
    assert stat.f_blocks * stat.f_frsize == TMPFS_BYTES  # really the tmpfs, not the host's disk
    try:
        yield small
    finally:
        small.free()


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` by relative path, with its bytes."""
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def big_compose(size: int) -> str:
    """A valid compose of exactly ``size`` bytes."""
    def text(padding: int) -> str:
        return json.dumps({"manifest_version": 2, "name": "big", "runner": "docker-compose",
                           "docker_compose_file": "# " + "x" * padding + "\nservices: {}\n"})

    result = text(size - len(text(0)))
    assert len(result.encode()) == size
    return result


def vm_ids(client: httpx.Client) -> set[str]:
    return {vm["id"] for vm in rpc(client, "Status")["vms"]}


def storage_error(response: httpx.Response) -> str:
    assert response.status_code == 507, f"{response.status_code} {response.text}"
    body: dict[str, Any] = response.json()
    assert body["code"] == "INSUFFICIENT_STORAGE"
    assert "/tmp" not in body["error"]  # names the file under run_path, nothing above it
    message: str = body["error"]
    return message


def test_create_on_a_full_disk_is_507_naming_the_file_and_leaves_nothing(
    daemon: DaemonProcess, disk: SmallDisk
) -> None:
    """CreateVm with no space (to create or to start): 507 naming the file; no VM, no directory."""
    body = {"name": "full", "image": FAKE_IMAGE, "compose_file": big_compose(600), "vcpu": 1,
            "memory": 64, "disk_size": 1, "stopped": True}
    with daemon.client() as client:
        listed, entries = vm_ids(client), disk.entries()
        disk.fill()
        message = storage_error(call(client, "CreateVm", body))
        assert re.fullmatch(rf"cannot write [0-9a-f-]{{36}}/vm-manifest\.json: {NO_SPACE}",
                            message), message
        assert vm_ids(client) == listed
        assert disk.entries() == entries

        # Room for the directory but not for what starting the VM writes: rolled back.
        disk.fill(leave_pages=4)
        message = storage_error(call(client, "CreateVm", body | {"stopped": False}))
        assert re.fullmatch(rf"cannot write [0-9a-f-]{{36}}/vm-state\.json: {NO_SPACE}",
                            message), message
        assert vm_ids(client) == listed
        assert disk.entries() == entries

        disk.free()
        vm_id = rpc(client, "CreateVm", body)["id"]
        assert vm_ids(client) == listed | {vm_id}
        assert disk.entries() == entries | {vm_id}


def test_update_on_a_full_disk_is_507_and_leaves_the_vm_as_it_was(
    daemon: DaemonProcess, disk: SmallDisk
) -> None:
    """UpdateVm that does not fit: 507; files, GetInfo unchanged; no journal; ReloadVms: 0 updated."""
    new_compose = big_compose(3 * PAGE - 1500)
    update = {"id": "", "compose_file": new_compose, "user_config": "after"}
    with daemon.client() as client:
        vm_id = create(client, FAKE_IMAGE, stopped=True, user_config="before")
        update["id"] = vm_id
        files, info = snapshot(disk.root / vm_id), vm_info(client, vm_id)
        # No room at all; then room for the new compose and user_config but not the journal
        # (the old code's journal fit there and its update was replayed after reporting a 500).
        for leave_pages, failed_file in ((0, "shared/app-compose.json"), (4, JOURNAL)):
            disk.fill(leave_pages)
            message = storage_error(call(client, "UpdateVm", update))
            assert message == f"cannot write {vm_id}/{failed_file}: {NO_SPACE}"
            assert snapshot(disk.root / vm_id) == files
            assert vm_info(client, vm_id) == info
            assert rpc(client, "ReloadVms") == {"loaded": 0, "updated": 0, "removed": 0}
            assert vm_info(client, vm_id) == info
            disk.free()

        answer = rpc(client, "UpdateVm", update)
        assert answer["id"] == hashlib.sha256(new_compose.encode()).hexdigest()[:40]
        after = snapshot(disk.root / vm_id)
        assert after["shared/app-compose.json"] == new_compose.encode()
        assert after["shared/.user-config"] == b"after"
        assert set(after) == set(files)  # no journal, no staged copies left
        assert rpc(client, "ReloadVms") == {"loaded": 0, "updated": 0, "removed": 0}
        assert vm_info(client, vm_id)["configuration"]["user_config"] == "after"


def test_start_on_a_full_disk_is_507_and_changes_nothing(
    daemon: DaemonProcess, disk: SmallDisk
) -> None:
    """StartVm whose desired-state write finds no space: 507 naming the file, the VM stays stopped."""
    with daemon.client() as client:
        vm_id = create(client, FAKE_IMAGE, stopped=True)
        files, info = snapshot(disk.root / vm_id), vm_info(client, vm_id)
        disk.fill()
        message = storage_error(call(client, "StartVm", {"id": vm_id}))
        assert message.startswith(f"cannot write {vm_id}/"), message
        assert snapshot(disk.root / vm_id) == files
        assert vm_info(client, vm_id) == info
        disk.free()


@pytest.mark.parametrize(("code", "kind"), [
    (errno.ENOSPC, InsufficientStorage), (errno.EDQUOT, InsufficientStorage),
    (errno.EIO, StorageError), (errno.EROFS, StorageError),
])
def test_storage_error_kinds(code: int, kind: type[StorageError]) -> None:
    """A full disk or quota is INSUFFICIENT_STORAGE, other write failures STORAGE; both 507."""
    error = StorageError.of(OSError(code, os.strerror(code)), "vm-1/vm-manifest.json")
    assert type(error) is kind
    assert error.status_code == 507
    assert error.code == ("INSUFFICIENT_STORAGE" if kind is InsufficientStorage else "STORAGE")
    assert error.message == f"cannot write vm-1/vm-manifest.json: {os.strerror(code)}"
    assert error.path == "vm-1/vm-manifest.json"
