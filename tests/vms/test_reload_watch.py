"""ReloadVms over the directory watch: every kind of change is seen, whatever inotify can do.

The registry runs in-process over the real QEMU backend and supervisor (no VM ever starts), so
its ``DiskView`` can be given each kind of watch: the normal one, one whose watch limit is
reached at once, one without inotify, and one whose event queue overflows before every reload.
All must report the same counts and memory; only the normal one may skip stamping a VM.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.in_process import in_process_config, state_dir
from tests.support.vm_ops import FAKE_IMAGE
from vmm.backend.qemu.backend import QemuBackend
from vmm.core.inotify import DirWatch
from vmm.host.capabilities import detect
from vmm.model.workdir import Workdir
from vmm.rpc import vmm_rpc_pb2 as pb
from vmm.supervisor.client import ensure_supervisor
from vmm.vms import reconcile
from vmm.vms.manager import Manager
from vmm.vms.reconcile import DiskView, ReloadResult
from vmm.vms.update import JOURNAL, stage_update

COMPOSE = json.dumps({"manifest_version": 2, "name": "demo", "runner": "docker-compose",
                      "docker_compose_file": "services: {}\n"})
MODES = ("inotify", "watch limit", "no inotify", "overflow")


@pytest.fixture
def state() -> Iterator[Path]:
    with state_dir("rw") as path:
        yield path


def watch_for(mode: str) -> DirWatch:
    if mode == "watch limit":
        return DirWatch(max_watches=1)  # the run directory's: no VM directory gets one
    return DirWatch(enabled=mode != "no inotify")


def queue_limit() -> int:
    return int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())


def flood(run: Path) -> None:
    """More events on the (watched) run directory than the kernel queues: some are lost."""
    files = [run / ".flood-a", run / ".flood-b"]
    for path in files:
        path.touch()
    for n in range(queue_limit() + 10):  # alternate files: identical events would merge
        os.utime(files[n % 2], ns=(n, n))


def edit_in_place(path: Path, old: str, new: str) -> None:
    """Rewrite ``path`` in place (same inode), the same size: only its times change."""
    assert len(old) == len(new)
    text = path.read_text()
    assert old in text
    with path.open("r+b") as fp:
        fp.write(text.replace(old, new).encode())


def replace_atomically(path: Path, data: dict[str, object]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)


def clone(run: Path, source: str, new_id: str) -> None:
    shutil.copytree(run / source, run / new_id)
    manifest = run / new_id / "vm-manifest.json"
    replace_atomically(manifest, json.loads(manifest.read_text()) | {"id": new_id})


async def wait_until(what: str, check: Callable[[], bool], timeout: float = 30.0) -> None:
    for _ in range(int(timeout / 0.05)):
        if check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.parametrize("mode", MODES)
def test_every_kind_of_change_is_reloaded(state: Path, mode: str) -> None:
    """Atomic and in-place edits, new files, a replaced directory, a journal, new, removing and
    vanished directories: the same ReloadVms answers with or without a working watch."""
    if mode == "overflow" and queue_limit() > 200_000:
        pytest.skip("max_queued_events too large to overflow the queue in a test")
    if mode != "no inotify" and not DirWatch().available:
        pytest.skip("inotify is not available here")

    async def scenario() -> None:
        config = in_process_config(state)
        supervisor = await ensure_supervisor(
            Path(config.supervisor.sock), Path(config.supervisor.pid_file),
            Path(config.supervisor.log_file), state_file=Path(config.supervisor.state_file),
        )
        manager = Manager(config, detect(config.cvm), QemuBackend(config, supervisor))
        watch = watch_for(mode)
        manager.disk_view = DiskView(watch)
        run = manager.run_path
        try:
            await reconcile.load_all(manager)
            a, b, c = [await manager.create(pb.VmConfiguration(
                name=name, image=FAKE_IMAGE, compose_file=COMPOSE, vcpu=1, memory=256,
                disk_size=1, stopped=True)) for name in ("aaaa", "bbbb", "cccc")]

            async def reload(*, settles: bool = True, **expected: int) -> None:
                if mode == "overflow":
                    flood(run)
                    watch.poll()
                    assert watch.dirty_among(list(manager.vms)) == list(manager.vms)
                assert await reconcile.reload(manager) == ReloadResult(**expected)
                if settles:  # the next reload stamps nothing, unless the watch cannot tell
                    dirty = watch.dirty_among(list(manager.vms))
                    assert (dirty == []) == (mode in ("inotify", "overflow")), dirty

            await reload()  # the new VMs are stamped and watched
            await reload()

            replace_atomically(run / a / "vm-manifest.json",
                               json.loads((run / a / "vm-manifest.json").read_text())
                               | {"name": "renamed"})
            await reload(updated=1)
            assert manager.get(a).manifest.name == "renamed"

            edit_in_place(run / b / "shared" / "app-compose.json", "demo", "omed")
            await reload(updated=1)
            assert '"omed"' in manager.get(b).shared.compose

            (run / b / "shared" / ".user-config").write_text("user")
            await reload(updated=1)
            assert manager.get(b).shared.user_config == "user"

            copy = state / "c-copy"
            shutil.copytree(run / c, copy)
            edit_in_place(copy / "vm-manifest.json", '"cccc"', '"newc"')
            (run / c).rename(state / "c-old")
            copy.rename(run / c)
            await reload(updated=1)
            assert manager.get(c).manifest.name == "newc"
            edit_in_place(run / c / "vm-manifest.json", '"newc"', '"NEWC"')  # the new directory
            edit_in_place(state / "c-old" / "vm-manifest.json", '"cccc"', '"oldc"')  # not it
            await reload(updated=1)
            assert manager.get(c).manifest.name == "NEWC"

            vm_a = manager.get(a)
            stage_update(Workdir(run / a), vm_a.manifest.evolve(vcpu=3),
                         vm_a.shared).write_journal()  # an update a crash interrupted
            # Rolling it forward writes files after the poll: dirty until the next reload.
            await reload(updated=1, settles=False)
            assert manager.get(a).manifest.vcpu == 3
            assert not (run / a / JOURNAL).exists()
            await reload()

            replace_atomically(run / a / "vm-state.json", {"started": False})
            await reload()  # rewritten, but equal

            clone(run, a, "dropped-in")
            clone(run, a, "doomed")
            (run / "doomed" / ".removing").touch()
            await reload(loaded=2)
            assert manager.get("dropped-in").manifest.vcpu == 3
            await wait_until("the removal", lambda: "doomed" not in manager.vms)
            assert not (run / "doomed").exists()

            (run / b).rename(state / "b-gone")
            await reload(removed=1)
            assert b not in manager.vms
            await reload()
        finally:
            await manager.close()
            await supervisor.aclose()

    asyncio.run(scenario())
