"""The VM registry and lifecycle: create, start, stop, shut down, remove, report, recover.

Disk is the truth and memory the cache: every change of a VM's manifest or desired state is
written (atomically) before the call returns, and Status reads only memory. QEMU processes
belong to the supervisor, so the daemon can die at any point; at start ``load_all`` rebuilds the
registry from the work directories and adopts the processes that still run.

Each VM has a lock that serialises its lifecycle calls; creation holds the manager's lock while
it checks port conflicts and takes a CID, so two creates cannot claim the same resources.

Beside this module: ``vm_update`` (UpdateVm/ResizeVm), ``limits`` (capacity), ``reconcile``
(load_all and ReloadVms), and the watcher's duties ``auto_restart`` and ``log_rotation``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import errno
import json
import logging
import os
import socket
from collections import deque
from collections.abc import Iterable
from pathlib import Path

from vmm.backend.qemu import argv as qemu_argv
from vmm.backend.qemu.qmp import qmp_execute
from vmm.core.config import Config
from vmm.core.exceptions import (
    Conflict,
    InvalidField,
    StorageError,
    SupervisorError,
    SupervisorUnavailable,
    Unavailable,
    VmNotFound,
)
from vmm.core.names import VM_ID, is_valid_name
from vmm.guest.hub import ChannelHub
from vmm.host import gpus
from vmm.host.capabilities import HostCapabilities
from vmm.model.cid_pool import CidPool
from vmm.model.compose import compose_hash
from vmm.model.images import Image
from vmm.model.manifest import DesiredState, ManifestError, PortMap
from vmm.model.vm import Vm, process_note
from vmm.model.workdir import Workdir, create_workdir, shown_path
from vmm.rpc import vmm_rpc_pb2 as pb
from vmm.supervisor.client import SupervisorClient
from vmm.supervisor.types import ProcessConfig, ProcessInfo
from vmm.vms import limits, log_rotation, reconcile
from vmm.vms.auto_restart import AutoRestart
from vmm.vms.request import build_vm, describe_port, find_image, ports_clash

log = logging.getLogger(__name__)

WATCH_INTERVAL = 1.0
AGENT_SHUTDOWN_TIMEOUT = 5.0
REMOVE_POLL = 0.5
# A SIGKILLed QEMU normally goes in milliseconds; one that does not is stuck in the kernel.
REMOVE_TIMEOUT = 120.0
QEMU_IMG_TIMEOUT = 120.0


class Manager:
    def __init__(self, config: Config, host: HostCapabilities, supervisor: SupervisorClient) -> None:
        self.config = config
        self.host = host
        self.supervisor = supervisor
        self.run_path = Path(config.run_path).absolute()
        self.vms: dict[str, Vm] = {}
        self.cids = CidPool(config.cvm.cid_start, config.cvm.cid_pool_size)
        self._create_lock = asyncio.Lock()
        self._watcher: asyncio.Task[None] | None = None
        self.auto_restart = AutoRestart(self, config.cvm.auto_restart)
        self.log_rotation = log_rotation.LogRotation(config.cvm.log, self.vms.values)
        self.channels = ChannelHub(self, config, host)

    # -- lookup -------------------------------------------------------------------------------

    def get(self, vm_id: str) -> Vm:
        vm = self.vms.get(vm_id)
        if vm is None:
            raise VmNotFound(vm_id)
        return vm

    def workdir_of(self, vm_id: str) -> Path | None:
        vm = self.vms.get(vm_id)
        return vm.workdir.path if vm else None

    # -- create -------------------------------------------------------------------------------

    async def create(self, request: pb.VmConfiguration) -> str:
        manifest, shared, image = build_vm(self.config, request)
        async with self._create_lock:
            self._check_port_conflicts(manifest.id, manifest.port_map)
            limits.check_fits(self.config, self.vms.values(), vcpu=manifest.vcpu,
                              memory_mb=manifest.memory)
            cid = self.cids.allocate(manifest.id)
            try:
                workdir = await asyncio.to_thread(
                    create_workdir, self.run_path, manifest, shared, not request.stopped
                )
            except BaseException:
                self.cids.release(cid)
                raise
            vm = Vm(workdir=workdir, manifest=manifest, shared=shared, started=False, cid=cid,
                    image_version=image.version, events=self._event_ring())
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
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):  # a write() names no file
            return StorageError.of(exc, shown_path(self.run_path, vm.workdir.path))
        return None

    def _check_port_conflicts(self, vm_id: str, ports: Iterable[PortMap]) -> None:
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

    # -- start / stop / shutdown ----------------------------------------------------------------

    async def start(self, vm_id: str) -> None:
        vm = self.get(vm_id)
        async with vm.lock:
            if vm.removing:
                raise Conflict(f"VM {vm_id} is being removed")
            if not vm.running:
                limits.check_fits(self.config, self.vms.values(), vcpu=vm.manifest.vcpu,
                                  memory_mb=vm.manifest.memory, exclude=vm.id)
            # A failed boot still leaves the start wanted (auto-restart retries it), but a start
            # the daemon cannot even attempt, with no supervisor, must leave no trace.
            await self.supervisor.check()
            await self._set_started(vm, True)
            if vm.running:
                return
            image = find_image(self.config, vm.manifest.image)
            await self._prepare_boot(vm, image)
            spec = await self._with_gpus(self._launch_spec(vm, image))
            argv = qemu_argv.build_qemu_argv(spec, self.config)
            config = ProcessConfig(
                id=vm.id, name=vm.manifest.name, command=argv[0], args=argv[1:], env={},
                cwd=str(vm.workdir.path), stdout=str(vm.workdir.stdout_log),
                stderr=str(vm.workdir.stderr_log), pidfile=str(vm.workdir.qemu_pid),
                cid=vm.cid, note=process_note(),
            )
            try:
                await self.supervisor.deploy(config)
            except SupervisorError as exc:
                vm.add_event("vmm.start_failed", exc.message)
                raise Unavailable(f"cannot start VM {vm_id}: {exc.message}") from None
            vm.boot_progress, vm.boot_error, vm.shutdown_progress = "booting", "", ""
            vm.instance_id, vm.app_url = "", ""
            await self.channels.close(vm)  # a previous boot's channels point at dead sockets
            self.channels.open(vm)
            vm.process = await self._process_after(vm, "started")
            vm.add_event("vmm.started", f"pid {vm.process.state.pid if vm.process else '?'}")
            log.info("started VM %s", vm.id)

    def _launch_spec(self, vm: Vm, image: Image) -> qemu_argv.LaunchSpec:
        return qemu_argv.LaunchSpec(
            manifest=vm.manifest, image=image, workdir=vm.workdir.path, cid=vm.cid,
            host=self.host, compose_hash=compose_hash(vm.shared.compose),
        )

    async def _with_gpus(self, spec: qemu_argv.LaunchSpec) -> qemu_argv.LaunchSpec:
        """Resolve the VM's GPU attachment against this host's PCI devices (at each start)."""
        gpu_config = self.config.cvm.gpu
        if spec.manifest.gpus is None or not gpu_config.enabled:
            return spec
        devices = gpus.parse_lspci(await asyncio.to_thread(gpus.read_lspci))
        slots, bridges = gpus.resolve_attachment(spec.manifest.gpus, devices, gpu_config)
        return dataclasses.replace(spec, gpu_slots=slots, bridge_slots=bridges,
                                   numa_node_of=gpus.numa_node_of)

    async def _prepare_boot(self, vm: Vm, image: Image) -> None:
        wd = vm.workdir
        for stale in (wd.serial_pty, wd.qmp_socket, wd.path / qemu_argv.AGENT_SOCKET,
                      wd.path / qemu_argv.HOST_API_SOCKET):
            stale.unlink(missing_ok=True)
        self._check_host_ports_free(vm)
        if not wd.disk.exists():
            argv = qemu_argv.qemu_img_create_argv(self._launch_spec(vm, image))
            await _run(argv, QEMU_IMG_TIMEOUT)
        await asyncio.to_thread(wd.write_json, wd.sys_config, self._sys_config(vm, image))
        await log_rotation.rotate_for_boot(wd, self.config.cvm.log)
        stamp = dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()
        with wd.serial_log.open("ab") as serial:
            serial.write(f"\n===== boot @ {stamp} =====\n".encode())

    def _check_host_ports_free(self, vm: Vm) -> None:
        """Refuse to boot into a certain failure: QEMU exits if a hostfwd port is taken."""
        for port in vm.manifest.port_map:
            family = socket.AF_INET6 if ":" in port.address else socket.AF_INET
            kind = socket.SOCK_STREAM if port.protocol == "tcp" else socket.SOCK_DGRAM
            with socket.socket(family, kind) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    probe.bind((port.address, port.host_port))
                except OSError as exc:
                    if exc.errno != errno.EADDRINUSE:
                        raise
                    raise Conflict(
                        f"host port {port.protocol} {port.address}:{port.host_port} "
                        "is in use by another process"
                    ) from None

    def _sys_config(self, vm: Vm, image: Image) -> dict[str, object]:
        cvm = self.config.cvm
        vm_config = {
            "os_image_hash": "",
            "cpu_count": vm.manifest.vcpu,
            "memory_size": vm.manifest.memory * 1024 * 1024,
            "qemu_version": self.host.qemu_version,
            "pci_hole64_size": cvm.qemu_pci_hole64_size,
            "hugepages": vm.manifest.hugepages,
            "num_gpus": len(vm.manifest.gpus.gpus) if vm.manifest.gpus else 0,
            "num_nvswitches": 0,
            "hotplug_off": cvm.qemu_hotplug_off,
            "image": image.name,
            "host_share_mode": cvm.host_share_mode,
            "spec_version": 1,
        }
        return {
            "kms_urls": list(vm.manifest.kms_urls or cvm.kms_urls),
            "gateway_urls": list(vm.manifest.gateway_urls or cvm.gateway_urls),
            "pccs_url": cvm.pccs_url,
            "collateral_urls": {"pccs": cvm.pccs_url},
            "nvidia_attestation_proxy_url": None,
            "docker_registry": cvm.docker_registry,
            "host_api_url": f"vsock://2:{self.config.host_api.port}/api",
            "vm_config": json.dumps(vm_config),
        }

    async def stop(self, vm_id: str) -> None:
        vm = self.get(vm_id)
        async with vm.lock:
            # Killed first: if the supervisor cannot be reached the VM runs on, wanted running.
            await self._kill(vm)
            await self._set_started(vm, False)
            vm.add_event("vmm.stopped", "hard stop")

    async def _kill(self, vm: Vm) -> None:
        """Stop the VM's QEMU; raises if the supervisor did not get the request."""
        if vm.process is not None or await self.supervisor.info(vm.id) is not None:
            await self.supervisor.stop(vm.id)
            vm.process = await self._process_after(vm, "stopped")
        await self.channels.close(vm)

    async def _process_after(self, vm: Vm, done: str) -> ProcessInfo | None:
        """The process state after a start or stop that happened, even if it cannot be read."""
        try:
            return await self.supervisor.info(vm.id)
        except SupervisorError as exc:
            # The call must not fail for it: the watcher brings the state up to date.
            log.warning("VM %s: %s, but cannot read its process state: %s", vm.id, done,
                        exc.message)
            return vm.process

    async def shutdown(self, vm_id: str) -> None:
        """Press the ACPI power button; a watcher hard-stops the VM after the timeout."""
        vm = self.get(vm_id)
        async with vm.lock:
            if not vm.running:
                raise Conflict(f"VM {vm_id} is not running (status: {vm.status})")
            progress = vm.shutdown_progress
            vm.shutdown_progress = "shutting down"
            try:
                how = await self._request_poweroff(vm)
            except BaseException:
                vm.shutdown_progress = progress
                raise
            # After the request: one that reached neither guest nor supervisor changes nothing.
            await self._set_started(vm, False)
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
        try:
            await qmp_execute(vm.workdir.qmp_socket, "system_powerdown")
        except Unavailable as exc:
            await self._kill(vm)
            vm.shutdown_progress = "stopped"
            vm.add_event("vmm.shutdown", f"forced: agent and ACPI unavailable ({exc.message})")
            return None
        vm.add_event("vmm.shutdown", "ACPI power button pressed")
        return "ACPI"

    async def _finish_shutdown(self, vm: Vm, timeout: float, how: str) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline:
            with contextlib.suppress(SupervisorUnavailable):  # restarting; ask again next round
                vm.process = await self.supervisor.info(vm.id)
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
            except SupervisorError as exc:
                vm.add_event("vmm.shutdown", f"hard stop after {timeout:g}s failed: {exc.message}")
                return
        vm.shutdown_progress = "stopped"
        vm.add_event("vmm.shutdown", f"forced: no power-off within {timeout:g}s, hard stop")

    async def set_desired(self, vm: Vm, *, started: bool) -> None:
        await self._set_started(vm, started)

    async def apply_notification(self, vm: Vm, event: str, payload: str) -> None:
        await self.channels.apply_notification(vm, event, payload)

    async def _set_started(self, vm: Vm, started: bool) -> None:
        if vm.started != started or not vm.workdir.state.exists():
            await asyncio.to_thread(vm.workdir.write_desired, DesiredState(started=started))
        vm.started = started

    # -- remove -------------------------------------------------------------------------------

    async def remove(self, vm_id: str) -> None:
        vm = self.get(vm_id)
        async with vm.lock:
            if vm.removing:
                return
            # The removal ends in the background through the supervisor: accept it only if
            # one answers, so a dead one gets a 503 and leaves no `.removing` mark behind.
            await self.supervisor.check()
            vm.removing = True
            await asyncio.to_thread(vm.workdir.mark_removing)
        vm.add_event("vmm.removing")
        vm.spawn(self._finish_removal(vm))

    async def _finish_removal(self, vm: Vm) -> None:
        try:
            async with vm.lock, asyncio.timeout(REMOVE_TIMEOUT):
                while True:
                    try:
                        info = await self.supervisor.info(vm.id)
                        if info is None:
                            break
                        if info.state.status != "running":
                            await self.supervisor.remove(vm.id)
                            break
                        await self.supervisor.stop(vm.id)
                    except SupervisorUnavailable as exc:
                        # Being restarted: wait for it rather than give up until the next start.
                        log.warning("removing VM %s: %s; trying again", vm.id, exc.message)
                    await asyncio.sleep(REMOVE_POLL)
                await self._forget(vm, delete=True)
            log.info("removed VM %s", vm.id)
        except TimeoutError:
            log.error("VM %s: not removed within %gs (its QEMU outlived SIGKILL, or the "
                      "supervisor is down); it stays 'removing' and is retried at start",
                      vm.id, REMOVE_TIMEOUT)
        except Exception:
            log.exception("removing VM %s failed; it stays 'removing' and is retried at start",
                          vm.id)

    async def _rollback(self, vm: Vm) -> None:
        """Undo a create whose start failed; a QEMU that did start must not outlive its dir."""
        with contextlib.suppress(SupervisorError):
            if await self.supervisor.info(vm.id) is not None:
                await self.supervisor.stop(vm.id)
                await self.supervisor.remove(vm.id)
        await self._forget(vm, delete=True)

    async def _forget(self, vm: Vm, *, delete: bool) -> None:
        await self.channels.close(vm)
        if delete:
            await asyncio.to_thread(vm.workdir.delete)
        self.cids.release(vm.cid)
        self.vms.pop(vm.id, None)

    # -- report -------------------------------------------------------------------------------

    def status(self, request: pb.StatusRequest) -> pb.StatusResponse:
        wanted = set(request.ids)
        vms = [vm for vm in self.vms.values() if not wanted or vm.id in wanted]
        if request.keyword:
            word = request.keyword
            vms = [vm for vm in vms if word in vm.manifest.name or word in vm.id
                   or word in vm.manifest.app_id or word in vm.manifest.image]
        vms.sort(key=lambda vm: (vm.manifest.created_at_ms, vm.id))
        total = len(vms)
        if request.page_size:
            # Pages count from 1 as in dstack's UI; page 0 is also the first page.
            first = (max(request.page, 1) - 1) * request.page_size
            vms = vms[first : first + request.page_size]
        return pb.StatusResponse(
            vms=[vm.info(brief=request.brief, guest_channel=self.host.channel) for vm in vms],
            port_mapping_enabled=self.config.cvm.port_mapping.enabled,
            total=total,
        )

    # -- recovery -----------------------------------------------------------------------------

    async def load_all(self) -> None:
        """Rebuild the registry from disk and adopt what the supervisor still runs."""
        await reconcile.load_all(self)

    def _load_one(self, workdir: Workdir, process: ProcessInfo | None) -> Vm | None:
        if not is_valid_name(workdir.id, VM_ID):
            log.warning("leaving %s untouched: not a VM id", workdir.path)
            return None
        try:
            manifest = workdir.read_manifest()
            desired = workdir.read_desired()
            shared = workdir.read_shared()
        except (OSError, ManifestError) as exc:
            log.warning("leaving %s untouched: cannot load it: %s", workdir.path, exc)
            return None
        if manifest.id != workdir.id:
            log.warning("leaving %s untouched: manifest id %r does not match the directory",
                        workdir.path, manifest.id)
            return None
        cid = None
        if process is not None and process.state.status == "running" and process.config.cid:
            if self.cids.occupy(process.config.cid, manifest.id):
                cid = process.config.cid
            else:
                log.warning("VM %s runs with CID %s outside the pool or taken",
                            manifest.id, process.config.cid)
        if cid is None:
            cid = self.cids.allocate(manifest.id)
        try:
            image_version = find_image(self.config, manifest.image).version
        except InvalidField:
            image_version = ""
        vm = Vm(workdir=workdir, manifest=manifest, shared=shared, started=desired.started,
                cid=cid, image_version=image_version, removing=workdir.is_removing,
                process=process, events=self._event_ring())
        if vm.running:
            vm.boot_progress = "running"
            vm.add_event("vmm.adopted", f"pid {process.state.pid if process else '?'}")
            self.channels.open(vm)
        self.vms[manifest.id] = vm
        return vm

    def _event_ring(self) -> deque[pb.GuestEvent]:
        return deque(maxlen=self.config.event_buffer_size)

    # -- watching -----------------------------------------------------------------------------

    def start_watching(self) -> None:
        self._watcher = asyncio.create_task(self._watch())

    async def close(self) -> None:
        tasks = [t for vm in self.vms.values() for t in vm.background]
        if self._watcher:
            tasks.append(self._watcher)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _watch(self) -> None:
        """Keep process state current so Status never asks the supervisor."""
        while True:
            try:
                await self.refresh()
            except SupervisorError as exc:
                log.warning("cannot refresh VM states: %s", exc.message)
            except Exception:
                log.exception("refreshing VM states failed")
            for duty in (self.auto_restart.tick, self.log_rotation.tick):
                try:
                    await duty()
                except Exception:
                    log.exception("watcher duty %s failed", duty.__qualname__)
            await asyncio.sleep(WATCH_INTERVAL)

    async def refresh(self) -> None:
        processes = {p.config.id: p for p in await self.supervisor.list()}
        for vm in list(self.vms.values()):
            before = vm.running
            vm.process = processes.get(vm.id)
            if before and not vm.running and vm.process is not None:
                state = vm.process.state
                how = (f"exit code {state.exit_code}" if state.exit_code is not None
                       else f"signal {state.signal}" if state.signal is not None else "unknown")
                vm.add_event("vmm.exited", f"QEMU {state.status} ({how})")
                await self.channels.close(vm)


async def _run(argv: list[str], timeout: float) -> None:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        output, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise Unavailable(f"{argv[0]} timed out after {timeout:g}s") from None
    if proc.returncode != 0:
        raise Unavailable(f"{' '.join(argv[:3])} failed: {output.decode(errors='replace')[-500:]}")
