"""Reconciliation: make the registry match the work directories and what the backend runs.

One procedure serves daemon start (``load_all``) and ReloadVms (``reload``):

1. **Known VMs are re-read** (not at start, where none are known). Each VM's manifest, desired
   state and shared files are read under the VM's lock, so no lifecycle call is half-way through
   writing them; the configuration is swapped in and the runtime state (runtime, events, boot
   progress, CID) is kept. A VM counts as ``updated`` only if something on disk differed from
   memory, so a reload with no edits reports nothing. A directory that no longer parses keeps
   its last good configuration (logged). Files are read only if their stamp (``disk_stamp``:
   inode, size, mtime and ctime of each file, and whether an update journal exists; taken
   before reading) changed since the last reload read them: an unchanged VM costs a few
   ``stat`` calls, so a reload with nothing changed takes milliseconds for 1,000 VMs. Every
   write, the daemon's atomic renames as an operator's in-place edit, changes the stamp.
2. **CIDs are rebuilt** from the backend's running VMs and the VMs in memory. A
   running VM keeps its CID whoever else held it ("running wins"; the loser gets a fresh
   CID for its next start), a stopped VM keeps its own otherwise, and CIDs owned by nobody are
   freed. The CID of a running VM that has no directory (an orphan) stays reserved while it runs,
   so it is never handed to a second VM.
3. **Vanished directories**: their VMs are forgotten (``removed``), after their QEMU is stopped and
   dropped from the backend. Nothing on disk is touched.
4. **New directories** are loaded (``loaded``): an update journal a crash left behind is rolled
   forward first (``update.finish_pending``), then the VM is built by the registry
   (``Registry.adopt``), adopting its QEMU if the backend runs it.
5. **Orphans**, VMs the backend runs with no loadable directory, are reported in the log and
   left alone: never stopped, never deleted (their directory may come back, or an operator may
   want to look at them).
6. **Desired state is applied**: ``.removing`` directories finish their removal, and VMs whose
   ``vm-state.json`` says started but which do not run are started, in the background.

At start, leftovers of interrupted creates and deletes (``.creating-*``) are removed first; on
ReloadVms they are not, since one may belong to a create in progress.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from vmm.backend.base import VmBackend
from vmm.core.config import Config
from vmm.core.exceptions import BackendError, InvalidField, Unavailable, VmmError
from vmm.model.cid_pool import CidPool
from vmm.model.manifest import DesiredState, Manifest, ManifestError
from vmm.model.runtime import Runtime
from vmm.model.vm import Vm
from vmm.model.workdir import SharedFiles, Workdir, clean_staging
from vmm.vms.request import find_image
from vmm.vms.update import JOURNAL, finish_pending

log = logging.getLogger(__name__)

_OnDisk = tuple[Manifest, DesiredState, SharedFiles]
_Stamp = tuple[object, ...]
# The files a VM's configuration is read from, and the update journal (see vms.update).
_STAMPED = ("vm-manifest.json", "vm-state.json", "shared/app-compose.json",
            "shared/.encrypted-env", "shared/.user-config", JOURNAL)


class Registry(Protocol):
    """What reconciliation needs of the VM registry (the Manager provides it)."""

    @property
    def config(self) -> Config: ...
    @property
    def run_path(self) -> Path: ...
    @property
    def vms(self) -> dict[str, Vm]: ...
    @property
    def cids(self) -> CidPool: ...
    @property
    def backend(self) -> VmBackend: ...
    @property
    def registry_lock(self) -> asyncio.Lock: ...
    def adopt(self, workdir: Workdir, runtime: Runtime | None,
              image_versions: dict[str, str] | None = None) -> Vm | None: ...
    async def start(self, vm_id: str) -> None: ...
    async def finish_removal(self, vm: Vm) -> None: ...
    async def discard(self, vm: Vm) -> None: ...
    async def forget(self, vm: Vm, *, delete: bool) -> None: ...


@dataclass(frozen=True)
class ReloadResult:
    loaded: int = 0
    updated: int = 0
    removed: int = 0


async def load_all(manager: Registry) -> ReloadResult:
    """Daemon start: rebuild the registry from disk and adopt what the supervisor still runs."""
    for leftover in await asyncio.to_thread(clean_staging, manager.run_path):
        log.info("removed leftover of an interrupted create/delete: %s", leftover)
    result = await reconcile(manager)
    log.info("loaded %d VMs (%d running)", len(manager.vms),
             sum(1 for vm in manager.vms.values() if vm.running))
    return result


async def reload(manager: Registry) -> ReloadResult:
    """ReloadVms: pick up directories added, changed or removed behind the daemon's back."""
    result = await reconcile(manager)
    log.info("reload: %d loaded, %d updated, %d removed", result.loaded, result.updated,
             result.removed)
    return result


async def reconcile(manager: Registry) -> ReloadResult:
    updated = await _reread_known(manager)
    # Held while CIDs are rebuilt and new VMs registered: CreateVm allocates CIDs and adds VMs
    # under the same lock. No VM lock is taken inside it (lock order is VM lock, then this one).
    async with manager.registry_lock:
        runtimes = await manager.backend.runtimes()
        present, new = await asyncio.to_thread(_scan, manager.run_path, set(manager.vms))
        running = {vm_id: r for vm_id, r in runtimes.items() if r.running and r.is_vm}
        _rebuild_cids(manager, running)
        vanished = [vm for vm in manager.vms.values()
                    if not vm.removing and vm.id not in present]
        loaded: list[Vm] = []
        image_versions: dict[str, str] = {}
        for name in new:
            try:
                vm = manager.adopt(Workdir(manager.run_path / name), runtimes.get(name),
                                   image_versions)
            except VmmError as exc:
                log.warning("leaving %s untouched: %s", manager.run_path / name, exc.message)
                continue
            if vm is not None:
                loaded.append(vm)
        for vm_id, runtime in running.items():
            if vm_id not in manager.vms:
                log.warning(
                    "orphan: the backend runs %s (%s, pid %s, CID %s) but no VM directory loads "
                    "for it; leaving it alone (its CID stays reserved)", vm_id,
                    runtime.name, runtime.pid, runtime.cid)
    for vm in vanished:
        await _drop_vanished(manager, vm)
    for vm in loaded:
        if vm.removing:
            vm.spawn(manager.finish_removal(vm))
    for vm in list(manager.vms.values()):
        if vm.started and not vm.running and not vm.removing:
            vm.spawn(_start(manager, vm))
    return ReloadResult(loaded=len(loaded), updated=updated, removed=len(vanished))


# -- step 1: known VMs ------------------------------------------------------------------------


async def _reread_known(manager: Registry) -> int:
    known = [vm for vm in manager.vms.values() if not vm.removing]
    # Free locks are taken all at once without waiting (no await between the check and the
    # acquire), and their directories read in one worker thread: 1,000 VMs cost one hop.
    idle = [vm for vm in known if not vm.lock.locked()]
    busy = [vm for vm in known if vm.lock.locked()]
    for vm in idle:
        await vm.lock.acquire()
    updated = 0
    try:
        found = await asyncio.to_thread(_read_changed, [(vm.workdir, vm.disk_stamp) for vm in idle])
        for vm, (now, on_disk) in zip(idle, found, strict=True):
            if now is not None and now == vm.disk_stamp:
                continue
            updated += _swap(manager, vm, on_disk)
            if isinstance(on_disk, tuple) and on_disk[0].id == vm.id:
                vm.disk_stamp = now  # memory now matches these files
    finally:
        for vm in idle:
            vm.lock.release()
    for vm in busy:
        async with vm.lock:
            if vm.removing or manager.vms.get(vm.id) is not vm:
                continue
            on_disk = (await asyncio.to_thread(_read_many, [vm.workdir]))[0]
            updated += _swap(manager, vm, on_disk)
    return updated


def _read_changed(
    known: list[tuple[Workdir, _Stamp | None]],
) -> list[tuple[_Stamp | None, _OnDisk | Exception | None]]:
    """Each directory's stamp, and its files if the stamp differs from the known one."""
    found: list[tuple[_Stamp | None, _OnDisk | Exception | None]] = []
    for wd, known_stamp in known:
        now = stamp(wd)
        if now is not None and now == known_stamp:
            found.append((now, None))
        else:
            found.append((now, _read_many([wd])[0]))
    return found


def stamp(workdir: Workdir) -> _Stamp | None:
    """(inode, size, mtime, ctime) of each configuration file, None for an absent one.

    None for the whole stamp if the directory cannot be read. Taken before the files are read,
    so that a write racing the read shows as a change next time.
    """
    directory = str(workdir.path)
    found: list[object] = []
    for name in _STAMPED:
        try:
            # os.stat on a str: a Path per file costs more than the stat, 6,000 times a reload.
            st = os.stat(f"{directory}/{name}")  # noqa: PTH116
        except FileNotFoundError:
            found.append(None)
        except OSError:
            return None
        else:
            found.append((st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
    return tuple(found)


def _read_many(workdirs: list[Workdir]) -> list[_OnDisk | Exception | None]:
    """Each directory's manifest, desired state and shared files; None if it is gone."""
    found: list[_OnDisk | Exception | None] = []
    for wd in workdirs:
        try:
            finish_pending(wd)
            found.append((wd.read_manifest(), wd.read_desired(), wd.read_shared()))
        except FileNotFoundError:
            found.append(None if not wd.path.exists() else FileNotFoundError(wd.manifest))
        except (OSError, ManifestError) as exc:
            found.append(exc)
    return found


def _swap(manager: Registry, vm: Vm, on_disk: _OnDisk | Exception | None) -> bool:
    if on_disk is None:
        return False  # the directory vanished: step 3 deals with it
    if isinstance(on_disk, Exception):
        log.warning("VM %s: keeping the loaded configuration, cannot re-read %s: %s",
                    vm.id, vm.workdir.path, on_disk)
        return False
    manifest, desired, shared = on_disk
    if manifest.id != vm.id:
        log.warning("VM %s: keeping the loaded configuration, the manifest on disk names %r",
                    vm.id, manifest.id)
        return False
    if manifest == vm.manifest and shared == vm.shared and desired.started == vm.started:
        return False
    if manifest.image != vm.manifest.image:
        try:
            vm.image_version = find_image(manager.config, manifest.image).version
        except InvalidField:
            vm.image_version = ""
    vm.manifest, vm.shared, vm.started = manifest, shared, desired.started
    vm.add_event("vmm.reloaded", "configuration re-read from disk")
    log.info("VM %s: configuration re-read from disk", vm.id)
    return True


# -- step 2: CIDs -----------------------------------------------------------------------------


def _rebuild_cids(manager: Registry, running: dict[str, Runtime]) -> None:
    pool = manager.cids
    owners: dict[int, str] = {}
    for vm_id, runtime in running.items():
        cid = runtime.cid
        if cid is None:
            continue
        if not pool.contains(cid):
            log.warning("VM %s runs with CID %d, outside the pool", vm_id, cid)
        elif cid in owners:
            log.warning("VMs %s and %s both run with CID %d", owners[cid], vm_id, cid)
        else:
            owners[cid] = vm_id
    homeless: list[Vm] = []
    for vm in manager.vms.values():
        own = running.get(vm.id)
        if own is not None and own.cid is not None and owners.get(own.cid) == vm.id:
            vm.cid = own.cid
        elif pool.contains(vm.cid) and owners.setdefault(vm.cid, vm.id) == vm.id:
            pass
        else:
            homeless.append(vm)
    pool.reset(owners)
    for vm in homeless:
        old = vm.cid
        try:
            vm.cid = pool.allocate(vm.id)
        except VmmError as exc:
            log.error("VM %s keeps CID %d, which is in use elsewhere: %s", vm.id, old, exc.message)
            continue
        log.warning("VM %s: CID %d is taken by a running VM; it gets CID %d for its next start",
                    vm.id, old, vm.cid)


# -- steps 3 and 4: directories ---------------------------------------------------------------


def _scan(run_path: Path, known: set[str]) -> tuple[set[str], list[str]]:
    """(every VM-like directory name, the new ones in order); new ones' journals rolled forward."""
    present: set[str] = set()
    try:
        with os.scandir(run_path) as entries:
            for entry in entries:
                if not entry.name.startswith(".") and entry.is_dir(follow_symlinks=False):
                    present.add(entry.name)
    except FileNotFoundError:
        return set(), []
    new = sorted(present - known)
    for name in new:
        try:
            if update_left(f"{run_path}/{name}"):
                finish_pending(Workdir(run_path / name))
        except OSError as exc:
            log.warning("cannot finish the interrupted update of %s: %s", run_path / name, exc)
    return present, new


def update_left(directory: str) -> bool:
    """Whether an update left a journal or staged files (``.<name>.update``) to deal with.

    Two directory listings instead of ``finish_pending``'s five failing calls: at start-up,
    1,000 VMs with nothing left over cost a quarter of the time.
    """
    for path in (directory, f"{directory}/shared"):
        try:
            names = os.listdir(path)  # noqa: PTH208 - names only, no Path per entry
        except FileNotFoundError:
            continue
        if JOURNAL in names or any(n.startswith(".") and n.endswith(".update") for n in names):
            return True
    return False


async def _drop_vanished(manager: Registry, vm: Vm) -> None:
    async with vm.lock:
        if manager.vms.get(vm.id) is not vm:
            return
        try:
            await manager.discard(vm)
        except (BackendError, Unavailable) as exc:
            log.warning("VM %s: directory gone, but its QEMU could not be stopped: %s",
                        vm.id, exc.message)
        await manager.forget(vm, delete=False)
    log.info("VM %s: its directory is gone; forgotten", vm.id)


async def _start(manager: Registry, vm: Vm) -> None:
    try:
        await manager.start(vm.id)
    except Exception as exc:
        reason = exc.message if isinstance(exc, VmmError) else f"{type(exc).__name__}: {exc}"
        log.warning("could not start VM %s, which should run: %s", vm.id, reason)
