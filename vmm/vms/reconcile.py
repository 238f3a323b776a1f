"""Reconciliation: make the registry match the work directories and what the backend runs.

One procedure serves daemon start (``load_all``) and ReloadVms (``reload``):

1. **Known VMs are re-read** (not at start, where none are known). Each VM's manifest, desired
   state and shared files are read under the VM's lock, so no lifecycle call is half-way through
   writing them; the configuration is swapped in and the runtime state (runtime, events, boot
   progress, CID) is kept. A VM counts as ``updated`` only if something on disk differed from
   memory, so a reload with no edits reports nothing. A directory that no longer parses keeps
   its last good configuration (logged). Files are read only if their stamp (``disk_stamp``:
   inode, size, mtime and ctime of each file, and whether an update journal exists; taken
   before reading) changed since the last reload read them. Every write, the daemon's atomic
   renames as an operator's in-place edit, changes the stamp (``vm_files``). And a VM is
   stamped only if inotify saw an event on those files since it was last found unchanged
   (``DiskView``; all of them where inotify cannot tell): a reload with nothing changed costs
   one poll of the event queue, not 6,000 ``stat`` calls, at 1,000 VMs.
2. **CIDs are rebuilt** from the backend's running VMs and the VMs in memory. A
   running VM keeps its CID whoever else held it ("running wins"; the loser gets a fresh
   CID for its next start), a stopped VM keeps its own otherwise, and CIDs owned by nobody are
   freed. The CID of a running VM that has no directory (an orphan) stays reserved while it runs,
   so it is never handed to a second VM.
3. **Vanished directories**: their VMs are forgotten (``removed``), after their QEMU is stopped and
   dropped from the backend. Nothing on disk is touched. The run directory is listed again
   only if it had events since its last listing.
4. **New directories** are loaded (``loaded``): an update journal a crash left behind is rolled
   forward first (``update.finish_pending``), and the files are read in a worker thread
   (``vm_files.read_new``); then the VM is built by the registry (``Registry.adopt``),
   adopting its QEMU if the backend runs it.
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
from vmm.core.inotify import DirWatch
from vmm.core.names import VM_ID, is_valid_name
from vmm.model.cid_pool import CidPool
from vmm.model.manifest import DesiredState, Manifest, ManifestError
from vmm.model.runtime import Runtime
from vmm.model.vm import Vm
from vmm.model.workdir import SharedFiles, Workdir, clean_staging
from vmm.vms.request import find_image
from vmm.vms.update import finish_pending
from vmm.vms.vm_files import Found, Stamp, read_new, stamp, update_left, watch_workdir

__all__ = ["DiskView", "ReloadResult", "load_all", "reload", "stamp", "update_left"]

log = logging.getLogger(__name__)

_OnDisk = tuple[Manifest, DesiredState, SharedFiles]
_RUN_DIR = ""  # the watch key of the run directory (VM ids are never empty)


class DiskView:
    """What reconciliation remembers between runs, to skip what did not change.

    ``watch`` is keyed by VM id (its directory and ``shared/``), and ``""`` for the run
    directory, whose last listing is ``listing``.
    """

    def __init__(self, watch: DirWatch | None = None) -> None:
        self.watch = watch if watch is not None else DirWatch()
        self.listing: frozenset[str] = frozenset()

    async def drain(self) -> None:
        """Read the events so far, so a busy directory cannot overflow the queue between reloads.

        The manager's watcher calls it every second: a VM's serial log raises an event per
        write, which only the poll's name filter discards.
        """
        if self.watch.available:
            await asyncio.to_thread(self.watch.poll)

    def close(self) -> None:
        self.watch.close()


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
    @property
    def disk_view(self) -> DiskView: ...
    def adopt(self, workdir: Workdir, runtime: Runtime | None, found: Found,
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
    if not manager.disk_view.watch.available:
        log.info("inotify is unavailable: each ReloadVms will stat every VM's files")
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
        view = manager.disk_view
        present, new, epoch = await asyncio.to_thread(_scan, manager.run_path, set(manager.vms),
                                                      view)
        running = {vm_id: r for vm_id, r in runtimes.items() if r.running and r.is_vm}
        _rebuild_cids(manager, running)
        vanished = [vm for vm in manager.vms.values()
                    if not vm.removing and vm.id not in present]
        loaded: list[Vm] = []
        image_versions: dict[str, str] = {}
        for name, found in new:
            workdir = Workdir(manager.run_path / name)
            vm = None
            if isinstance(found, Exception):
                log.warning("leaving %s untouched: cannot load it: %s", workdir.path, found)
            elif found is not None:
                try:
                    vm = manager.adopt(workdir, runtimes.get(name), found, image_versions)
                except VmmError as exc:
                    log.warning("leaving %s untouched: %s", workdir.path, exc.message)
            if vm is None:
                view.watch.forget(name)  # looked at again by every reload, as a new one
                continue
            view.watch.settle(name, epoch)  # read after _scan watched it
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
    watch = manager.disk_view.watch
    known = [vm for vm in manager.vms.values() if not vm.removing]
    # Only directories with events since they were last found unchanged are stamped (all of
    # them if inotify cannot tell; see vmm.core.inotify): 1,000 quiet VMs cost one poll.
    epoch, dirty = await asyncio.to_thread(_poll_dirty, watch, [vm.id for vm in known])
    if not dirty:
        return 0
    suspects = set(dirty)
    known = [vm for vm in known if vm.id in suspects]
    # Free locks are taken all at once without waiting (no await between the check and the
    # acquire), and their directories read in one worker thread: 1,000 VMs cost one hop.
    idle = [vm for vm in known if not vm.lock.locked()]
    busy = [vm for vm in known if vm.lock.locked()]
    for vm in idle:
        await vm.lock.acquire()
    updated = 0
    try:
        found = await asyncio.to_thread(
            _read_changed, [(vm.workdir, vm.disk_stamp) for vm in idle], watch)
        for vm, (now, on_disk) in zip(idle, found, strict=True):
            if now is None or now != vm.disk_stamp:
                updated += _swap(manager, vm, on_disk)
                if isinstance(on_disk, tuple) and on_disk[0].id == vm.id:
                    vm.disk_stamp = now  # memory now matches these files
            if now is not None and now == vm.disk_stamp:
                watch.settle(vm.id, epoch)  # clean until its next event
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


def _poll_dirty(watch: DirWatch, vm_ids: list[str]) -> tuple[int, list[str]]:
    """The events so far read (the epoch to settle with), and the VMs that may have changed."""
    epoch = watch.poll()
    return epoch, watch.dirty_among(vm_ids)


def _read_changed(
    known: list[tuple[Workdir, Stamp | None]], watch: DirWatch | None = None,
) -> list[tuple[Stamp | None, _OnDisk | Exception | None]]:
    """Each directory's stamp, and its files if the stamp differs from the known one.

    With ``watch``, each directory is watched (again) before it is stamped, so a change after
    the stamp is an event for the next reload.
    """
    found: list[tuple[Stamp | None, _OnDisk | Exception | None]] = []
    for wd, known_stamp in known:
        if watch is not None:
            watch_workdir(watch, wd)
        now = stamp(wd)
        if now is not None and now == known_stamp:
            found.append((now, None))
        else:
            found.append(_read_one(wd, now))
    return found


def _read_many(workdirs: list[Workdir]) -> list[_OnDisk | Exception | None]:
    """Each directory's manifest, desired state and shared files; None if it is gone."""
    return [_read_one(wd, None)[1] for wd in workdirs]


def _read_one(wd: Workdir, before: Stamp | None) -> tuple[Stamp | None,
                                                          _OnDisk | Exception | None]:
    """A pending update finished, then the stamp and the files (None if the directory is gone).

    Stamped after the update is finished, so the stamp matches what is read (no second
    re-read next time); ``before`` stands if the files cannot be read.
    """
    try:
        if finish_pending(wd):
            before = stamp(wd)
        return before, (wd.read_manifest(), wd.read_desired(), wd.read_shared())
    except FileNotFoundError:
        return before, None if not wd.path.exists() else FileNotFoundError(wd.manifest)
    except (OSError, ManifestError) as exc:
        return before, exc


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


def _scan(run_path: Path, known: set[str], view: DiskView,
          ) -> tuple[frozenset[str], list[tuple[str, Found | Exception | None]], int]:
    """Every VM-like directory name, the new ones with what they hold, and the poll's epoch.

    The run directory is listed only if it had events since its last listing. New directories
    are watched, then read (``read_new``: an interrupted update is finished first); None for
    a name that is not a VM id.
    """
    watch = view.watch
    epoch = watch.poll()  # under the registry lock: every create and delete so far is in it
    if not watch.is_clean(_RUN_DIR):
        watch.watch(_RUN_DIR, (str(run_path),))
        view.listing = _list_vm_dirs(run_path)
        watch.settle(_RUN_DIR, epoch)
        watch.retain(view.listing | {_RUN_DIR})  # VMs gone since: their watches go too
    present = view.listing
    new: list[tuple[str, Found | Exception | None]] = []
    for name in sorted(present - known):
        workdir = Workdir(run_path / name)
        if not is_valid_name(name, VM_ID):
            log.warning("leaving %s untouched: not a VM id", workdir.path)
            new.append((name, None))
            continue
        watch_workdir(watch, workdir)  # before it is read: a later write is an event
        try:
            new.append((name, read_new(workdir)))
        except (OSError, ManifestError) as exc:
            new.append((name, exc))
    return present, new, epoch


def _list_vm_dirs(run_path: Path) -> frozenset[str]:
    present: set[str] = set()
    try:
        with os.scandir(run_path) as entries:
            for entry in entries:
                if not entry.name.startswith(".") and entry.is_dir(follow_symlinks=False):
                    present.add(entry.name)
    except FileNotFoundError:
        pass
    return frozenset(present)


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
