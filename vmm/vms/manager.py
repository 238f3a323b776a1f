"""The VM registry and lifecycle: create, start, stop, shut down, remove, report, recover.

Disk is the truth and memory the cache: every change of a VM's manifest or desired state is
written (atomically) before the call returns, and Status reads only memory. QEMU runs under a
backend (``backend.base.VmBackend``: the supervisor's processes, or libvirt's domains) that
outlives the daemon, so the daemon can die at any point; at start ``load_all`` rebuilds the
registry from the work directories and adopts the VMs that still run.

A desired state is written only for an operation that happened or will: a start that the
backend cannot even attempt, a stop that did not reach it, or a power-off nobody received leave
``vm-state.json`` as it was.

Each VM has a lock that serialises its lifecycle calls; creation holds the registry lock while
it checks port conflicts and takes a CID, so two creates cannot claim the same resources.

Beside this module: ``update`` (UpdateVm/ResizeVm), ``limits`` (capacity), ``reconcile``
(load_all and ReloadVms), ``boot`` (the work directory before each boot), ``report`` (what
Status, GetInfo and /guest/NetworkInfo say), and the ``watcher`` with its duties
``auto_restart`` and ``log_rotation``. Each gets the narrow part of the registry it needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from collections import deque
from collections.abc import Iterable
from pathlib import Path

from guest_proxy.transport import GuestAgentClient
from vmm.backend.base import LaunchSpec, VmBackend
from vmm.core.config import Config
from vmm.core.exceptions import (
    OUT_OF_SPACE,
    BackendError,
    Conflict,
    InvalidField,
    StorageError,
    Unavailable,
    VmNotFound,
)
from vmm.guest.hub import ChannelHub
from vmm.host import gpus
from vmm.host.capabilities import HostCapabilities
from vmm.model.cid_pool import CidPool
from vmm.model.compose import compose_hash
from vmm.model.images import Image
from vmm.model.manifest import DesiredState, Manifest, PortMap
from vmm.model.runtime import Runtime
from vmm.model.vm import Vm
from vmm.model.workdir import SharedFiles, Workdir, create_workdir, shown_path
from vmm.net.forwards import Forwards
from vmm.net.leases import LeaseBook, nic_of_mac
from vmm.net.nics import resolve_networks
from vmm.rpc import vmm_rpc_pb2 as pb
from vmm.vms import boot, limits, log_rotation, reconcile, vm_files, watcher
from vmm.vms.auto_restart import AutoRestart
from vmm.vms.events import EventBus
from vmm.vms.report import VmReport
from vmm.vms.request import build_vm, describe_port, find_image, ports_clash

log = logging.getLogger(__name__)

AGENT_SHUTDOWN_TIMEOUT = 5.0
REMOVE_POLL = 0.5
# A SIGKILLed QEMU normally goes in milliseconds; one that does not is stuck in the kernel.
REMOVE_TIMEOUT = 120.0
# What a backend may raise when it refused a request, or could not be asked.
BACKEND_FAILURES = (BackendError, Unavailable)


class Manager:
    def __init__(self, config: Config, host: HostCapabilities, backend: VmBackend) -> None:
        self.config = config
        self.host = host
        self.backend = backend
        self.run_path = Path(config.run_path).absolute()
        self.vms: dict[str, Vm] = {}
        self.cids = CidPool(config.cvm.cid_start, config.cvm.cid_pool_size)
        # Held while resources are compared across VMs (ports, capacity, CIDs) and VMs added.
        self.registry_lock = asyncio.Lock()
        # Which VM directories changed since reconciliation last looked (ReloadVms skips the rest).
        self.disk_view = reconcile.DiskView()
        self._watcher: asyncio.Task[None] | None = None
        # Every VM's events go through this bus (each Vm gets ``_publish`` as its hook).
        self.events = EventBus()
        self.auto_restart = AutoRestart(config.cvm.auto_restart, vms=self.vms.values,
                                        start=self.start)
        self.log_rotation = log_rotation.LogRotation(config.cvm.log, self.vms.values)
        self.channels = ChannelHub(config, host, lookup=self.vms.get, cid_owner=self.cids.owner,
                                   set_desired=self.set_desired)
        # Bridge NICs' forwards follow leases and the lifecycle: each change recomputes them.
        self.forwards = Forwards(config.cvm.networking, self.vms.values, self._leased_ips)
        self.leases = LeaseBook(
            lambda mac: nic_of_mac(self.vms.values(), config.cvm.networking, mac),
            on_change=self._lease_changed,
        )
        self.report = VmReport(self.vms, config, host.channel, self.leases.ips)

    # -- lookup -------------------------------------------------------------------------------

    def get(self, vm_id: str) -> Vm:
        vm = self.vms.get(vm_id)
        if vm is None:
            raise VmNotFound(vm_id)
        return vm

    def workdir_of(self, vm_id: str) -> Path | None:
        vm = self.vms.get(vm_id)
        return vm.workdir.path if vm else None

    def agent_for(self, vm_id: str) -> GuestAgentClient:
        """The client of a running VM's guest agent (for /guest); 404 or 409 otherwise."""
        vm = self.get(vm_id)
        if not vm.running:
            raise Conflict(f"VM {vm.id} is not running (status: {vm.status})")
        return self.channels.agent(vm)

    # -- create -------------------------------------------------------------------------------

    async def create(self, request: pb.VmConfiguration) -> str:
        manifest, shared, image = build_vm(self.config, request)
        async with self.registry_lock:
            self.check_port_conflicts(manifest.id, manifest.port_map)
            self.check_capacity(manifest.vcpu, manifest.memory)
            cid = self.cids.allocate(manifest.id)
            try:
                workdir, stamp = await asyncio.to_thread(
                    _create_stamped, self.run_path, manifest, shared, not request.stopped
                )
            except BaseException:
                self.cids.release(cid)
                raise
            vm = Vm(workdir=workdir, manifest=manifest, shared=shared, started=False, cid=cid,
                    image_version=image.version, events=self._event_ring(),
                    on_event=self._publish, disk_stamp=stamp)
            self.vms[manifest.id] = vm
        vm.add_event("vmm.created", f"image {image.name}, {manifest.vcpu} vCPU, {manifest.memory} MB")
        log.info("created VM %s (%s)", manifest.id, manifest.name)
        if not request.stopped:
            try:
                await self.start(manifest.id)
            except BaseException as exc:
                await self._rollback(vm)
                if isinstance(exc, OSError) and (storage := self._storage_error(exc, vm)):
                    raise storage from exc
                raise
        return manifest.id

    def _storage_error(self, exc: OSError, vm: Vm) -> StorageError | None:
        """``exc`` as the 507 a client sees if a file of ``vm`` or space is at fault, else None."""
        path = Path(os.fsdecode(exc.filename)) if exc.filename else None
        if path is not None and path.is_relative_to(self.run_path):
            return StorageError.of(exc, shown_path(self.run_path, path))
        if exc.errno in OUT_OF_SPACE:  # a write() names no file
            return StorageError.of(exc, shown_path(self.run_path, vm.workdir.path))
        return None

    def check_port_conflicts(self, vm_id: str, ports: Iterable[PortMap]) -> None:
        for i, port in enumerate(ports):
            for other in self.vms.values():
                if other.id == vm_id:
                    continue
                for taken in other.manifest.port_map:
                    if ports_clash(port, taken):
                        raise Conflict(
                            f"ports[{i}]: {describe_port(port)} clashes with VM "
                            f"{other.manifest.name!r} ({other.id}): {describe_port(taken)}"
                        )

    def check_capacity(self, vcpu: int, memory_mb: int, exclude: str | None = None) -> None:
        limits.check_fits(self.config, self.vms.values(), vcpu=vcpu, memory_mb=memory_mb,
                          exclude=exclude)

    async def grow_disk(self, vm: Vm, size_gb: int) -> None:
        await self.backend.grow_disk(vm.workdir.disk, size_gb)

    # -- start / stop / shutdown ----------------------------------------------------------------

    async def start(self, vm_id: str) -> None:
        vm = self.get(vm_id)
        async with vm.lock:
            if vm.removing:
                raise Conflict(f"VM {vm_id} is being removed")
            if vm.running:
                await self.set_desired(vm, True)
                return
            self.check_capacity(vm.manifest.vcpu, vm.manifest.memory, exclude=vm.id)
            image = find_image(self.config, vm.manifest.image)
            spec = await self._with_gpus(self._launch_spec(vm, image))
            # A failed boot still leaves the start wanted (auto-restart retries it), but a start
            # the backend refuses or cannot even attempt must leave no trace.
            self.backend.check_supported(spec)
            await self.backend.ready()
            await self.set_desired(vm, True)
            await boot.prepare(vm, spec, self.backend, self.config, self.host)
            try:
                runtime = await self.backend.launch(spec)
            except BACKEND_FAILURES as exc:
                vm.add_event("vmm.start_failed", exc.message)
                raise Unavailable(f"cannot start VM {vm_id}: {exc.message}") from None
            vm.boot_progress, vm.boot_error, vm.shutdown_progress = "booting", "", ""
            vm.launched_at = time.monotonic()
            vm.instance_id, vm.app_url = "", ""
            await self.channels.close(vm)  # a previous boot's channels point at dead sockets
            self.channels.open(vm)
            vm.runtime = runtime or vm.runtime
            vm.add_event("vmm.started", f"pid {runtime.pid if runtime else '?'}")
            log.info("started VM %s", vm.id)
        await self.forwards.refresh()

    def _launch_spec(self, vm: Vm, image: Image) -> LaunchSpec:
        return LaunchSpec(
            manifest=vm.manifest, image=image, workdir=vm.workdir.path, cid=vm.cid,
            host=self.host, compose_hash=compose_hash(vm.shared.compose),
            nics=resolve_networks(vm.manifest, self.config.cvm.networking),
        )

    async def _with_gpus(self, spec: LaunchSpec) -> LaunchSpec:
        """Resolve the VM's GPU attachment against this host's PCI devices (at each start)."""
        gpu_config = self.config.cvm.gpu
        if spec.manifest.gpus is None or not gpu_config.enabled:
            return spec
        devices = gpus.parse_lspci(await asyncio.to_thread(gpus.read_lspci))
        slots, bridges = gpus.resolve_attachment(spec.manifest.gpus, devices, gpu_config)
        return dataclasses.replace(spec, gpu_slots=slots, bridge_slots=bridges,
                                   numa_node_of=gpus.numa_node_of)

    async def stop(self, vm_id: str) -> None:
        vm = self.get(vm_id)
        async with vm.lock:
            # Killed first: if the backend cannot be reached the VM runs on, wanted running.
            await self._kill(vm)
            await self.set_desired(vm, False)
            vm.add_event("vmm.stopped", "hard stop")

    async def _kill(self, vm: Vm) -> None:
        """Stop the VM's QEMU; raises if the backend did not get the request."""
        if vm.runtime is not None or await self.backend.runtime(vm.id) is not None:
            try:
                await self.backend.kill(vm.id)
            except BackendError as exc:
                # A QEMU that exited by itself meanwhile can make the backend refuse the kill:
                # the stop the caller wanted has happened, so only a VM still running fails it.
                if isinstance(exc, Unavailable) or await self._still_running(vm):
                    raise
                log.info("VM %s: the backend refused the kill (%s) but it no longer runs",
                         vm.id, exc.message)
            vm.runtime = await self._runtime_after(vm, "stopped")
        await self.channels.close(vm)
        await self.forwards.refresh()

    async def _still_running(self, vm: Vm) -> bool:
        runtime = await self.backend.runtime(vm.id)
        return runtime is not None and runtime.running

    async def _runtime_after(self, vm: Vm, done: str) -> Runtime | None:
        """The runtime state after a stop that happened, even if it cannot be read."""
        try:
            return await self.backend.runtime(vm.id)
        except BACKEND_FAILURES as exc:
            # The call must not fail for it: the watcher brings the state up to date.
            log.warning("VM %s: %s, but cannot read its state: %s", vm.id, done, exc.message)
            return vm.runtime

    # -- pause / resume -------------------------------------------------------------------------
    # A paused VM keeps everything a running one holds (memory, CID, ports, desired state), so
    # limits, auto-restart and log rotation see it as running; only Status says "paused".

    async def pause(self, vm_id: str) -> None:
        vm = self.get(vm_id)
        async with vm.lock:
            if vm.removing or not vm.running:
                raise Conflict(f"VM {vm_id} is not running (status: {vm.status})")
            if not vm.paused:
                await self.backend.pause(vm.id)
                vm.runtime = await self._runtime_after(vm, "paused")
                vm.add_event("vmm.paused", "vCPUs stopped")

    async def resume(self, vm_id: str) -> None:
        vm = self.get(vm_id)
        async with vm.lock:
            if vm.removing or not vm.running:
                raise Conflict(f"VM {vm_id} is not running (status: {vm.status})")
            if vm.paused:
                await self._resume(vm, "vCPUs running again")

    async def _resume(self, vm: Vm, why: str) -> None:
        await self.backend.resume(vm.id)
        vm.runtime = await self._runtime_after(vm, "resumed")
        vm.add_event("vmm.resumed", why)

    async def shutdown(self, vm_id: str) -> None:
        """Ask the guest to power off; a watcher hard-stops the VM after the timeout.

        A paused guest is resumed first: it cannot hear the agent or the power button while its
        vCPUs are stopped, and a graceful power-off is what ShutdownVm promises.
        """
        vm = self.get(vm_id)
        async with vm.lock:
            if not vm.running:
                raise Conflict(f"VM {vm_id} is not running (status: {vm.status})")
            if vm.paused:
                await self._resume(vm, "to shut it down")
            progress = vm.shutdown_progress
            vm.shutdown_progress = "shutting down"
            try:
                how = await self._request_poweroff(vm)
            except BaseException:
                vm.shutdown_progress = progress
                raise
            # After the request: one that reached neither guest nor backend changes nothing.
            await self.set_desired(vm, False)
            if how is None:
                return
            vm.spawn(self._finish_shutdown(vm, self.config.cvm.shutdown_timeout, how))

    async def _request_poweroff(self, vm: Vm) -> str | None:
        """Ask the guest agent to power off, else press the ACPI power button; say which."""
        try:
            await self.channels.agent(vm).call("Shutdown", timeout=AGENT_SHUTDOWN_TIMEOUT)
            vm.add_event("vmm.shutdown", "guest agent asked to power off")
            return "guest agent"
        except Unavailable as exc:
            log.info("VM %s: guest agent shutdown failed (%s); using ACPI", vm.id, exc.message)
        except Exception:
            # A channel that misbehaves in an unforeseen way must not turn a graceful shutdown
            # into a 500: the power button still works. The traceback says what went wrong.
            log.exception("VM %s: asking the guest agent to power off failed; using ACPI", vm.id)
        try:
            await self.backend.request_power_off(vm.id)
        except Exception as exc:
            if not isinstance(exc, Unavailable):  # unforeseen: keep its traceback for the log
                log.exception("VM %s: pressing the ACPI power button failed", vm.id)
            await self._kill(vm)
            vm.shutdown_progress = "stopped"
            reason = exc.message if isinstance(exc, Unavailable) else f"{type(exc).__name__}: {exc}"
            vm.add_event("vmm.shutdown", f"forced: agent and ACPI unavailable ({reason})")
            return None
        vm.add_event("vmm.shutdown", "ACPI power button pressed")
        return "ACPI"

    async def _finish_shutdown(self, vm: Vm, timeout: float, how: str) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline:
            with contextlib.suppress(Unavailable):  # restarting; ask again next round
                vm.runtime = await self.backend.runtime(vm.id)
            if not vm.running:
                vm.shutdown_progress = "stopped"
                await self.channels.close(vm)
                vm.add_event("vmm.shutdown", f"graceful: the guest powered off ({how})")
                return
            await asyncio.sleep(0.2)
        async with vm.lock:
            if vm.started or vm.removing:
                return  # someone started or removed it meanwhile; their call wins
            try:
                await self._kill(vm)
            except BACKEND_FAILURES as exc:
                vm.add_event("vmm.shutdown", f"hard stop after {timeout:g}s failed: {exc.message}")
                return
        vm.shutdown_progress = "stopped"
        vm.add_event("vmm.shutdown", f"forced: no power-off within {timeout:g}s, hard stop")

    async def set_desired(self, vm: Vm, started: bool) -> None:
        """Record (on disk, then in memory) whether the VM should run.

        One record at a time per VM: ShutdownVm and the guest's own "powering off" notice
        record it together, and two records interleaved could leave memory saying one thing
        and ``vm-state.json`` the other.
        """
        async with vm.desired_lock:
            if vm.started != started or not vm.workdir.state.exists():
                await asyncio.to_thread(vm.workdir.write_desired, DesiredState(started=started))
            vm.started = started

    # -- remove -------------------------------------------------------------------------------

    async def remove(self, vm_id: str) -> None:
        vm = self.get(vm_id)
        async with vm.lock:
            if vm.removing:
                return
            # The removal ends in the background through the backend: accept it only if the
            # backend answers, so a dead one gets a 503 and leaves no `.removing` mark behind.
            await self.backend.ready()
            vm.removing = True
            await asyncio.to_thread(vm.workdir.mark_removing)
        vm.add_event("vmm.removing")
        vm.spawn(self.finish_removal(vm))

    async def finish_removal(self, vm: Vm) -> None:
        """Stop and forget the VM's QEMU, then delete its directory (resumed at start)."""
        try:
            async with vm.lock, asyncio.timeout(REMOVE_TIMEOUT):
                while True:
                    try:
                        await self.discard(vm)
                        break
                    except Unavailable as exc:
                        # Being restarted: wait for it rather than give up until the next start.
                        log.warning("removing VM %s: %s; trying again", vm.id, exc.message)
                    await asyncio.sleep(REMOVE_POLL)
                await self.forget(vm, delete=True)
            log.info("removed VM %s", vm.id)
        except TimeoutError:
            log.error("VM %s: not removed within %gs (its QEMU outlived SIGKILL, or the "
                      "backend is down); it stays 'removing' and is retried at start",
                      vm.id, REMOVE_TIMEOUT)
        except Exception:
            log.exception("removing VM %s failed; it stays 'removing' and is retried at start",
                          vm.id)

    async def discard(self, vm: Vm) -> None:
        """Stop the VM's QEMU if it runs and drop the backend's record of it; wait until gone."""
        while True:
            runtime = await self.backend.runtime(vm.id)
            if runtime is None:
                return
            if not runtime.running:
                await self.backend.forget(vm.id)
                return
            await self.backend.kill(vm.id)
            await asyncio.sleep(REMOVE_POLL)

    async def _rollback(self, vm: Vm) -> None:
        """Undo a create whose start failed; a QEMU that did start must not outlive its dir."""
        with contextlib.suppress(*BACKEND_FAILURES, TimeoutError):
            async with asyncio.timeout(REMOVE_TIMEOUT):
                await self.discard(vm)
        await self.forget(vm, delete=True)

    async def forget(self, vm: Vm, *, delete: bool) -> None:
        """Drop the VM from the registry (and its directory with ``delete``)."""
        await self.channels.close(vm)
        if delete:
            await asyncio.to_thread(vm.workdir.delete)
        self.cids.release(vm.cid)
        if self.vms.pop(vm.id, None) is not None:
            body = "work directory deleted" if delete else "work directory gone (reload)"
            self.events.publish(vm.id, "vmm.removed", body, status="removed")
        self.leases.forget(vm.id)
        await self.forwards.refresh()

    # -- recovery -----------------------------------------------------------------------------

    async def load_all(self) -> None:
        """Rebuild the registry from disk and adopt what the backend still runs."""
        await reconcile.load_all(self)
        await self.forwards.open()
        await self.forwards.refresh()  # restores adopted VMs' forwards, drops those of gone VMs

    async def _lease_changed(self, vm_id: str, nic: int, ip: str | None) -> None:
        """A NIC's lease moved: say so on the VM (its version, so Status, follows) and re-forward."""
        vm = self.vms.get(vm_id)
        if vm is not None:
            vm.add_event("vmm.dhcp_lease", f"NIC {nic}: {ip or 'released'}")
        await self.forwards.refresh()

    def _leased_ips(self, vm_id: str) -> dict[int, str]:
        return self.leases.ips(vm_id)

    def adopt(self, workdir: Workdir, runtime: Runtime | None, found: vm_files.Found,
              image_versions: dict[str, str] | None = None) -> Vm | None:
        """Load one work directory into the registry, with its QEMU if the backend runs it.

        ``found`` is what the directory holds, read by reconcile (in a worker thread).

        ``image_versions`` memoises image name -> version over one reconciliation, so loading
        1,000 VMs of one image reads its metadata once.
        """
        manifest, desired, shared = found.manifest, found.desired, found.shared
        if manifest.id != workdir.id:
            log.warning("leaving %s untouched: manifest id %r does not match the directory",
                        workdir.path, manifest.id)
            return None
        cid = None
        if runtime is not None and runtime.running and runtime.cid:
            if self.cids.occupy(runtime.cid, manifest.id):
                cid = runtime.cid
            else:
                log.warning("VM %s runs with CID %s outside the pool or taken",
                            manifest.id, runtime.cid)
        if cid is None:
            cid = self.cids.allocate(manifest.id)
        known = image_versions if image_versions is not None else {}
        image_version = known.get(manifest.image)
        if image_version is None:
            try:
                image_version = find_image(self.config, manifest.image).version
            except InvalidField:
                image_version = ""
            known[manifest.image] = image_version
        vm = Vm(workdir=workdir, manifest=manifest, shared=shared, started=desired.started,
                cid=cid, image_version=image_version, removing=found.removing,
                runtime=runtime, events=self._event_ring(), on_event=self._publish,
                disk_stamp=found.stamp)
        if vm.running:
            vm.boot_progress = "running"
            vm.add_event("vmm.adopted", f"pid {runtime.pid if runtime else '?'}")
            self.channels.open(vm)
        else:
            # Not in the VM's ring (nothing happened to it), but watchers learn it is there.
            self.events.publish(vm.id, "vmm.loaded", "work directory loaded", status=vm.status)
        self.vms[manifest.id] = vm
        if workdir.leases.name in found.names:  # most have none: no failing open per VM
            self.leases.load(vm.id, workdir.leases)
        return vm

    def _publish(self, vm: Vm, event: pb.GuestEvent) -> None:
        self.events.publish(vm.id, event.event, event.body, status=vm.status,
                            timestamp_ms=event.timestamp)

    def _event_ring(self) -> deque[pb.GuestEvent]:
        return deque(maxlen=self.config.event_buffer_size)

    # -- watching (vmm.vms.watcher) ----------------------------------------------------------

    def start_watching(self) -> None:
        # forwards: a VM that powered off or crashed by itself loses its bridge forwards.
        # disk_view: reading the inotify queue each second keeps busy logs from overflowing it.
        duties = (self.auto_restart.tick, self.log_rotation.tick, self.forwards.refresh,
                  self.disk_view.drain)
        self._watcher = asyncio.create_task(watcher.watch(self.refresh, duties))

    async def close(self) -> None:
        tasks = [t for vm in self.vms.values() for t in vm.background]
        if self._watcher:
            tasks.append(self._watcher)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.channels.close_all()
        await self.forwards.close()
        self.disk_view.close()

    async def refresh(self) -> None:
        """Bring runtime states up to date from the backend (the watcher's first duty)."""
        await watcher.refresh_runtimes(self.vms, self.backend.runtimes, self.channels.close)


def _create_stamped(run_path: Path, manifest: Manifest, shared: SharedFiles,
                    started: bool) -> tuple[Workdir, tuple[object, ...] | None]:
    """A new work directory and the stamp of the files just written (what memory holds)."""
    workdir = create_workdir(run_path, manifest, shared, started)
    return workdir, reconcile.stamp(workdir)
