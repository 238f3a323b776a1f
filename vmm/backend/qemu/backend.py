"""The QEMU backend: the argv from ``argv.py``, run by the supervisor process, driven over QMP.

The supervisor owns the QEMU processes (they outlive the daemon) and reports them as
``ProcessInfo``; this module is the only place that turns a VM into a ``ProcessConfig`` and a
``ProcessInfo`` back into a backend-neutral ``Runtime``.

Whether a QEMU is paused is not in the supervisor's table: QEMU itself says so (QMP
``query-status``). It is asked once per QEMU process (keyed by pid: at adoption after a daemon
restart, or after any start), and from then on this backend's own ``stop``/``cont`` keep the
answer current, so the watcher's refresh does not open a QMP connection per VM per second.
The supervisor itself stays reachable for the Sv* RPCs, which are extras of this backend.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from pathlib import Path

from vmm.backend import disk
from vmm.backend.base import BackendInfo, LaunchSpec
from vmm.backend.qemu.argv import build_qemu_argv
from vmm.backend.qemu.qmp import qmp_execute
from vmm.core.config import Config
from vmm.core.exceptions import BackendError, Conflict, SupervisorError, Unavailable
from vmm.host.capabilities import HostCapabilities
from vmm.model.runtime import Runtime
from vmm.model.workdir import Workdir
from vmm.net import passt, tap
from vmm.net.nics import ResolvedNic
from vmm.supervisor.client import SupervisorClient, ensure_supervisor
from vmm.supervisor.types import ProcessConfig, ProcessInfo

log = logging.getLogger(__name__)

NAME = "qemu"
# A QEMU that does not answer query-status within this is asked again at the next refresh; the
# watcher must not wait the full QMP timeout per VM.
QUERY_DEADLINE = 1.0

PASST_START_TIMEOUT = 10.0


async def open_backend(config: Config, host: HostCapabilities) -> QemuBackend:
    """Connect to the supervisor, starting it (and restarting it should it die) if configured."""
    sv = config.supervisor
    sock, pid_file, log_file, state_file = (
        Path(p).absolute() for p in (sv.sock, sv.pid_file, sv.log_file, sv.state_file)  # noqa: ASYNC240
    )
    if sv.auto_start:
        # The daemon started it, so it also starts a new one should it die (a crash, an OOM
        # kill): without one no VM can be started, stopped or even listed.
        supervisor = await ensure_supervisor(sock, pid_file, log_file, state_file=state_file,
                                             restart=True)
    else:
        supervisor = SupervisorClient(sock)
        if not await supervisor.ping():
            await supervisor.aclose()
            raise SupervisorError(f"no supervisor answers on {sock} and supervisor.auto_start is false")
    return QemuBackend(config, supervisor, qemu_path=host.qemu_path)


class QemuBackend:
    def __init__(self, config: Config, supervisor: SupervisorClient, qemu_path: str = "") -> None:
        self.config = config
        self.supervisor = supervisor
        self.run_path = Path(config.run_path).absolute()
        # vm id -> (QEMU pid, paused): what QMP said of that process, or what we made it.
        self._paused: dict[str, tuple[int, bool]] = {}
        self._info = BackendInfo(
            name=NAME, version=qemu_path,
            features=("tdx", "sev-snp", "vsock", "serial-channel", "user-net", "gpus",
                      "hugepages", "pause"),
            unsupported=(),
        )

    @property
    def info(self) -> BackendInfo:
        return self._info

    def check_supported(self, spec: LaunchSpec) -> None:
        """Everything the argv builder can express runs here."""

    async def ready(self) -> None:
        await self.supervisor.check()

    async def prepare_disk(self, spec: LaunchSpec) -> None:
        await disk.create_if_missing(spec)

    async def grow_disk(self, path: Path, size_gb: int) -> None:
        await disk.grow(path, size_gb)

    async def launch(self, spec: LaunchSpec) -> Runtime | None:
        argv = build_qemu_argv(spec, self.config)
        for nic in spec.resolved_nics(self.config.cvm.networking):
            if nic.tap:
                try:
                    await tap.ensure_tap(nic.tap, nic.bridge)
                except OSError as exc:
                    raise BackendError(f"networks[{nic.index}]: cannot make its TAP: {exc}") from None
            if nic.mode == "passt":
                await self._start_passt(spec, nic)
        wd = Workdir(spec.workdir)
        await self.supervisor.deploy(ProcessConfig(
            id=spec.manifest.id, name=spec.manifest.name, command=argv[0], args=argv[1:], env={},
            cwd=str(wd.path), stdout=str(wd.stdout_log), stderr=str(wd.stderr_log),
            pidfile=str(wd.qemu_pid), cid=spec.cid, note=VM_NOTE,
        ))
        self._paused.pop(spec.manifest.id, None)
        return await self.runtime(spec.manifest.id)

    async def runtime(self, vm_id: str) -> Runtime | None:
        info = await self.supervisor.info(vm_id)
        return None if info is None else await self._with_paused(runtime_of(info), vm_id)

    async def runtimes(self) -> dict[str, Runtime]:
        found = {p.config.id: runtime_of(p) for p in await self.supervisor.list()}
        for vm_id in [i for i in self._paused if i not in found]:
            del self._paused[vm_id]
        return {vm_id: await self._with_paused(r, vm_id) for vm_id, r in found.items()}

    async def _with_paused(self, runtime: Runtime, vm_id: str) -> Runtime:
        if not runtime.running or runtime.pid is None or not runtime.is_vm:
            return runtime
        known = self._paused.get(vm_id)
        if known is None or known[0] != runtime.pid:
            try:
                state = await qmp_execute(self._qmp(vm_id), "query-status", deadline=QUERY_DEADLINE)
            except Unavailable as exc:
                # Booting (no QMP socket yet) or wedged: not known to be paused; asked again.
                log.debug("VM %s: query-status: %s", vm_id, exc.message)
                return runtime
            meanwhile = self._paused.get(vm_id)
            if meanwhile is not known and meanwhile is not None and meanwhile[0] == runtime.pid:
                known = meanwhile  # a pause or resume during the query: newer than its answer
            else:
                known = (runtime.pid, isinstance(state, dict) and state.get("status") == "paused")
                self._paused[vm_id] = known
        return dataclasses.replace(runtime, paused=known[1])

    async def pause(self, vm_id: str) -> None:
        await self._set_paused(vm_id, "stop", paused=True)

    async def resume(self, vm_id: str) -> None:
        await self._set_paused(vm_id, "cont", paused=False)

    async def _set_paused(self, vm_id: str, command: str, *, paused: bool) -> None:
        info = await self.supervisor.info(vm_id)
        if info is None or not info.state.running or info.state.pid is None:
            raise Conflict(f"VM {vm_id} is not running")
        await qmp_execute(self._qmp(vm_id), command)
        self._paused[vm_id] = (info.state.pid, paused)

    def _qmp(self, vm_id: str) -> Path:
        return Workdir(self.run_path / vm_id).qmp_socket

    async def request_power_off(self, vm_id: str) -> None:
        await qmp_execute(self._qmp(vm_id), "system_powerdown")

    async def _start_passt(self, spec: LaunchSpec, nic: ResolvedNic) -> None:
        """Start passt as a second supervised process of the VM, owned like its QEMU.

        dstack's id and note, so it outlives the daemon with the VM and is never taken for a
        VM; QEMU starts once passt's socket is there.
        """
        binary = passt.passt_binary()
        if not binary:
            raise BackendError(f"networks[{nic.index}]: passt is not installed on this host")
        wd = Workdir(spec.workdir)
        await asyncio.to_thread(passt.prepare_dir, wd.path)
        argv = passt.passt_argv(binary, wd.path, nic, runas=passt.daemon_user())
        note = json.dumps({"kind": "passt", "live_for": spec.manifest.id})
        await self.supervisor.deploy(ProcessConfig(
            id=passt.process_id(spec.manifest.id), name=f"passt-{spec.manifest.name}",
            command=argv[0], args=argv[1:], env={}, cwd=str(wd.path),
            stdout=str(wd.path / "passt.stdout"), stderr=str(wd.path / "passt.stdout"),
            pidfile=str(wd.path / "passt.pid"), note=note,
        ))  # fmt: skip
        sock = passt.socket_path(wd.path)
        deadline = asyncio.get_running_loop().time() + PASST_START_TIMEOUT
        while not await asyncio.to_thread(sock.exists):
            if asyncio.get_running_loop().time() > deadline:
                await self._stop_passt(spec.manifest.id)
                raise BackendError(f"networks[{nic.index}]: passt did not open {sock.name} "
                                   f"within {PASST_START_TIMEOUT:g}s (see passt.log)")  # fmt: skip
            await asyncio.sleep(0.05)

    async def _stop_passt(self, vm_id: str) -> None:
        if await self.supervisor.info(passt.process_id(vm_id)) is not None:
            await self.supervisor.stop(passt.process_id(vm_id))

    async def kill(self, vm_id: str) -> None:
        await self.supervisor.stop(vm_id)
        await self._stop_passt(vm_id)

    async def forget(self, vm_id: str) -> None:
        await self.supervisor.remove(vm_id)
        if await self.supervisor.info(passt.process_id(vm_id)) is not None:
            await self._stop_passt(vm_id)
            await self.supervisor.remove(passt.process_id(vm_id))
        await tap.remove_taps_of(vm_id)

    async def close(self) -> None:
        await self.supervisor.aclose()


# What the supervisor records beside a VM's QEMU (dstack's note format): a CVM, kept for good,
# whose serial console is appended to its log.
VM_NOTE = json.dumps({"kind": "cvm", "live_for": None, "serial_logappend": True})


def runtime_of(process: ProcessInfo) -> Runtime:
    state = process.state
    return Runtime(
        status=state.status, pid=state.pid, started_at=state.started_at,
        stopped_at=state.stopped_at, exit_code=state.exit_code, signal=state.signal,
        error=state.error or "", name=process.config.name, cid=process.config.cid,
        is_vm=_is_vm(process.config.note),
    )


def _is_vm(note: str) -> bool:
    """A VM process: note kind "" or "cvm", and not a temporary ``live_for`` process."""
    try:
        parsed = json.loads(note) if note else {}
    except json.JSONDecodeError:
        parsed = {}
    if not isinstance(parsed, dict):
        parsed = {}
    return parsed.get("kind", "") in ("", "cvm") and not parsed.get("live_for")

