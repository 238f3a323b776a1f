"""``VmBackend`` over libvirt-python: each VM is a persistent domain ``<prefix><vm id>``.

Domains are persistent (defineXML, then create) rather than transient: a transient domain
vanishes when it stops, and the seam wants a stopped VM's record (exit reason, "stopped" after a
kill) to stay until ``forget``; a persistent definition also names every VM this daemon owns
across daemon and libvirtd restarts. The VM id and guest CID are kept in the domain's
``<metadata>``; a domain with the prefix but without our metadata is never touched.

libvirt-python calls block, so each runs in a worker thread (``asyncio.to_thread``) over one
shared connection (libvirt connections are thread-safe). A call that fails on a dead connection
(libvirtd restarted) reconnects once and is retried.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, TypeVar

import libvirt  # type: ignore[import-untyped]

from vmm.backend import disk
from vmm.backend.base import BackendInfo, LaunchSpec
from vmm.backend.libvirt.domain import (
    DOMAIN_PREFIX,
    VMM_NS,
    DomainMeta,
    build_domain_xml,
    domain_name,
    parse_meta,
)
from vmm.backend.libvirt.procs import QemuProcesses
from vmm.backend.libvirt.support import (
    SEV_SNP_MIN_LIBVIRT,
    libvirt_version_tuple,
    unsupported_features,
)
from vmm.core.config import Config
from vmm.core.exceptions import BadRequest, Conflict, Unavailable, Unsupported
from vmm.host.capabilities import HostCapabilities
from vmm.model.runtime import Runtime, RuntimeStatus

log = logging.getLogger(__name__)

BACKEND_NAME = "libvirt"
JOB_SETTLE_TIMEOUT = 5.0
T = TypeVar("T")

# Errors that mean libvirt refused the definition itself, not that it failed to run it.
_DEFINE_ERRORS = frozenset({
    libvirt.VIR_ERR_XML_ERROR, libvirt.VIR_ERR_XML_DETAIL, libvirt.VIR_ERR_CONFIG_UNSUPPORTED,
    libvirt.VIR_ERR_INVALID_ARG, libvirt.VIR_ERR_XML_INVALID_SCHEMA,
})  # fmt: skip


def _log_libvirt_error(_context: object, error: tuple[object, ...]) -> None:
    # libvirt's default handler prints every error to stderr, even those this module handles
    # (an unknown domain is an ordinary answer here); the raised libvirtError carries it anyway.
    log.debug("libvirt: %s", error[2] if len(error) > 2 else error)


libvirt.registerErrorHandler(_log_libvirt_error, None)

_RUNNING_STATES = frozenset({
    libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_BLOCKED, libvirt.VIR_DOMAIN_PAUSED,
    libvirt.VIR_DOMAIN_SHUTDOWN, libvirt.VIR_DOMAIN_PMSUSPENDED,
})  # fmt: skip


class _Domain(Protocol):
    """The part of ``libvirt.virDomain`` this backend uses."""

    def name(self) -> str: ...
    def UUIDString(self) -> str: ...
    def state(self) -> list[int]: ...
    def isActive(self) -> int: ...
    def metadata(self, kind: int, uri: str | None, flags: int = 0) -> str: ...
    def create(self) -> int: ...
    def destroy(self) -> int: ...
    def suspend(self) -> int: ...
    def resume(self) -> int: ...
    def controlInfo(self, flags: int = 0) -> list[int]: ...
    def shutdownFlags(self, flags: int = 0) -> int: ...
    def undefineFlags(self, flags: int = 0) -> int: ...


class _Connection(Protocol):
    """The part of ``libvirt.virConnect`` this backend uses."""

    def lookupByName(self, name: str) -> _Domain: ...
    def listAllDomains(self, flags: int = 0) -> list[_Domain]: ...
    def defineXML(self, xml: str) -> _Domain: ...
    def getLibVersion(self) -> int: ...
    def getVersion(self) -> int: ...
    def isAlive(self) -> int: ...
    def close(self) -> int: ...


def runtime_status(state: int, reason: int) -> tuple[RuntimeStatus, int | None, str]:
    """(status, exit code, error) for a libvirt (state, reason) pair, as the supervisor reports.

    As under the QEMU backend, "exited" is a QEMU that ended while it was meant to run (the guest
    powered off, or QEMU died) and "stopped" one that was stopped on purpose or never ran.
    """
    if state in _RUNNING_STATES:
        return "running", None, ""
    if state == libvirt.VIR_DOMAIN_CRASHED:
        return "error", None, "the guest crashed"
    if state != libvirt.VIR_DOMAIN_SHUTOFF:
        return "stopped", None, ""
    if reason == libvirt.VIR_DOMAIN_SHUTOFF_SHUTDOWN:
        return "exited", 0, ""
    if reason == libvirt.VIR_DOMAIN_SHUTOFF_CRASHED:
        return "exited", None, "QEMU exited unexpectedly"
    if reason == libvirt.VIR_DOMAIN_SHUTOFF_DAEMON:
        return "exited", None, "libvirtd ended QEMU while reconnecting to it"
    if reason == libvirt.VIR_DOMAIN_SHUTOFF_FAILED:
        return "error", None, "QEMU failed to start"
    return "stopped", None, ""


async def open_backend(config: Config, host: HostCapabilities) -> LibvirtBackend:
    """Connect to ``[libvirt] uri`` and read its versions; Unavailable if it does not answer."""
    backend = LibvirtBackend(config, config.libvirt.uri, prefix=config.libvirt.domain_prefix,
                             vhost_vsock=host.channel == "vsock")
    return await backend.open()


class LibvirtBackend:
    """Runs VMs as libvirt domains. Call ``open`` once before use (it reads the versions)."""

    def __init__(
        self, config: Config, uri: str, *, prefix: str = DOMAIN_PREFIX,
        vhost_vsock: bool | None = None, processes: QemuProcesses | None = None,
    ) -> None:  # fmt: skip
        self.config = config
        self.uri = uri
        self.prefix = prefix
        self.vhost_vsock = Path("/dev/vhost-vsock").exists() if vhost_vsock is None else vhost_vsock
        self._processes = processes or QemuProcesses()
        self._conn: _Connection | None = None
        self._conn_lock = threading.Lock()
        self._libvirt_version = (0, 0, 0)
        self._qemu_version = (0, 0, 0)
        self._start_errors: dict[str, str] = {}

    async def open(self) -> LibvirtBackend:
        """Connect and read libvirt's and QEMU's versions; raise Unavailable if unreachable."""

        def versions(conn: _Connection) -> tuple[int, int]:
            return conn.getLibVersion(), conn.getVersion()

        lib, qemu = await self._call(versions)
        self._libvirt_version = libvirt_version_tuple(lib)
        self._qemu_version = libvirt_version_tuple(qemu)
        return self

    @property
    def info(self) -> BackendInfo:
        lib = ".".join(map(str, self._libvirt_version))
        qemu = ".".join(map(str, self._qemu_version))
        features = ["user-net", "port-forward", "bridge-net", "serial-channel", "9p-share",
                    "hugepages", "gpu-passthrough", "pause"]  # fmt: skip
        unsupported = [f"TDX: libvirt {lib} has no <launchSecurity type='tdx'>"]
        if self._libvirt_version < SEV_SNP_MIN_LIBVIRT:
            unsupported.append(f"SEV-SNP: libvirt {lib} has no <launchSecurity type='sev-snp'>")
        else:
            unsupported.append("SEV-SNP: not built by this backend yet")
        if self.vhost_vsock:
            features.append("vsock-channel")
        else:
            unsupported.append("vsock channel: no /dev/vhost-vsock on this host")
        unsupported.append("passt: Debian's libvirt 9.0 is built without passt")
        return BackendInfo(name=BACKEND_NAME, version=f"libvirt {lib}, QEMU {qemu}",
                           features=tuple(features), unsupported=tuple(unsupported))  # fmt: skip

    def check_supported(self, spec: LaunchSpec) -> None:
        problems = unsupported_features(spec, self.config, self._libvirt_version,
                                        vhost_vsock=self.vhost_vsock)  # fmt: skip
        if problems:
            raise Unsupported(BACKEND_NAME, problems)

    async def ready(self) -> None:
        await self._call(lambda conn: conn.getLibVersion())

    async def prepare_disk(self, spec: LaunchSpec) -> None:
        await disk.create_if_missing(spec)

    async def grow_disk(self, path: Path, size_gb: int) -> None:
        await disk.grow(path, size_gb)

    async def launch(self, spec: LaunchSpec) -> Runtime:
        self.check_supported(spec)
        vm_id = spec.manifest.id
        try:
            xml = build_domain_xml(spec, self.config, self.prefix)
        except ValueError as exc:
            raise BadRequest(f"VM {vm_id}: {exc}") from None
        name = domain_name(vm_id, self.prefix)

        def define_and_start(conn: _Connection) -> Runtime:
            existing = self._lookup(conn, name)
            if existing is not None:
                if self._ours(existing, vm_id) is None:
                    raise Conflict(f"libvirt domain {name!r} exists and is not this daemon's VM")
                if existing.isActive():
                    raise Conflict(f"VM {vm_id} is already running (domain {name!r})")
            try:
                domain = conn.defineXML(xml)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() in _DEFINE_ERRORS:
                    raise BadRequest(f"libvirt refused the domain of VM {vm_id}: {exc}") from None
                raise
            try:
                domain.create()
            except libvirt.libvirtError as exc:
                if not _alive(conn):
                    raise
                self._start_errors[vm_id] = str(exc)
                raise Conflict(f"libvirt could not start VM {vm_id}: {exc}") from None
            self._start_errors.pop(vm_id, None)
            meta = self._ours(domain, vm_id)
            assert meta is not None, "the domain was defined with our metadata"
            return self._runtime_of(domain, meta)

        return await self._call(define_and_start)

    async def runtime(self, vm_id: str) -> Runtime | None:
        name = domain_name(vm_id, self.prefix)

        def read(conn: _Connection) -> Runtime | None:
            domain = self._lookup(conn, name)
            meta = self._ours(domain, vm_id) if domain is not None else None
            if domain is None or meta is None:
                return None
            return self._runtime_of(domain, meta)

        return await self._call(read)

    async def runtimes(self) -> dict[str, Runtime]:
        def read_all(conn: _Connection) -> dict[str, Runtime]:
            found = {}
            for domain in conn.listAllDomains(0):
                name = domain.name()
                if not name.startswith(self.prefix):
                    continue
                try:
                    meta = self._ours(domain, name[len(self.prefix) :])
                    if meta is not None:
                        found[meta.vm_id] = self._runtime_of(domain, meta)
                except libvirt.libvirtError as exc:
                    if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                        raise  # else it was undefined after the listing: nothing to report
            return found

        return await self._call(read_all)

    async def request_power_off(self, vm_id: str) -> None:
        name = domain_name(vm_id, self.prefix)

        def press(conn: _Connection) -> None:
            domain = self._lookup(conn, name)
            if domain is None or not domain.isActive():
                raise Unavailable(f"VM {vm_id} is not running: no power button to press")
            try:
                domain.shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN)
            except libvirt.libvirtError as exc:
                if not _alive(conn):
                    raise
                raise Unavailable(f"VM {vm_id}: libvirt could not press the power button: "
                                  f"{exc}") from None  # fmt: skip

        await self._call(press)

    async def pause(self, vm_id: str) -> None:
        await self._set_paused(vm_id, paused=True)

    async def resume(self, vm_id: str) -> None:
        await self._set_paused(vm_id, paused=False)

    async def _set_paused(self, vm_id: str, *, paused: bool) -> None:
        name = domain_name(vm_id, self.prefix)

        def switch(conn: _Connection) -> None:
            domain = self._lookup(conn, name)
            if domain is None or self._ours(domain, vm_id) is None or not domain.isActive():
                raise Conflict(f"VM {vm_id} is not running")
            if (domain.state()[0] == libvirt.VIR_DOMAIN_PAUSED) == paused:
                return  # already so: suspend/resume would refuse
            if paused:
                domain.suspend()
            else:
                domain.resume()

        await self._call(switch)

    async def kill(self, vm_id: str) -> None:
        name = domain_name(vm_id, self.prefix)

        def destroy(conn: _Connection) -> None:
            domain = self._lookup(conn, name)
            if domain is None or not domain.isActive():
                return
            _wait_for_settled_job(domain)
            try:
                domain.destroy()
            except libvirt.libvirtError as exc:
                # It may have exited on its own between isActive and destroy.
                if exc.get_error_code() != libvirt.VIR_ERR_OPERATION_INVALID:
                    raise

        await self._call(destroy)

    async def forget(self, vm_id: str) -> None:
        name = domain_name(vm_id, self.prefix)

        def undefine(conn: _Connection) -> None:
            domain = self._lookup(conn, name)
            if domain is None or self._ours(domain, vm_id) is None:
                return
            if domain.isActive():
                raise Conflict(f"VM {vm_id} is still running: stop it before it is forgotten")
            domain.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
                                 | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
                                 | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)  # fmt: skip
            self._start_errors.pop(vm_id, None)

        await self._call(undefine)

    async def close(self) -> None:
        def close() -> None:
            with self._conn_lock:
                conn, self._conn = self._conn, None
            if conn is not None:
                try:
                    conn.close()
                except libvirt.libvirtError as exc:
                    log.debug("closing the libvirt connection: %s", exc)

        await asyncio.to_thread(close)

    # ---- helpers, all run in the worker thread ---------------------------------------------

    async def _call(self, operation: Callable[[_Connection], T]) -> T:
        return await asyncio.to_thread(self._with_connection, operation)

    def _with_connection(self, operation: Callable[[_Connection], T]) -> T:
        conn = self._connection()
        try:
            return operation(conn)
        except libvirt.libvirtError as exc:
            if _alive(conn):
                raise Unavailable(f"libvirt ({self.uri}): {exc}") from None
            log.info("libvirt connection to %s lost (%s); reconnecting", self.uri, exc)
            self._drop(conn)
        try:
            return operation(self._connection())
        except libvirt.libvirtError as exc:
            raise Unavailable(f"libvirt ({self.uri}): {exc}") from None

    def _connection(self) -> _Connection:
        with self._conn_lock:
            if self._conn is None:
                try:
                    self._conn = libvirt.open(self.uri)
                except libvirt.libvirtError as exc:
                    raise Unavailable(f"cannot connect to libvirt at {self.uri}: {exc}") from None
            return self._conn

    def _drop(self, conn: _Connection) -> None:
        with self._conn_lock:
            if self._conn is conn:
                self._conn = None
        try:
            conn.close()
        except libvirt.libvirtError as exc:
            log.debug("closing a dead libvirt connection: %s", exc)

    @staticmethod
    def _lookup(conn: _Connection, name: str) -> _Domain | None:
        try:
            return conn.lookupByName(name)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise

    @staticmethod
    def _ours(domain: _Domain, vm_id: str) -> DomainMeta | None:
        """The domain's metadata if it is this daemon's record of ``vm_id``, else None."""
        try:
            xml = domain.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, VMM_NS)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_METADATA:
                return None
            raise
        meta = parse_meta(xml)
        return meta if meta is not None and meta.vm_id == vm_id else None

    def _runtime_of(self, domain: _Domain, meta: DomainMeta) -> Runtime:
        state, reason = domain.state()[:2]
        status, exit_code, error = runtime_status(state, reason)
        if status == "error" and meta.vm_id in self._start_errors:
            error = self._start_errors[meta.vm_id]
        pid = started_at = None
        if status == "running":
            pid = self._processes.pid_of(domain.UUIDString())
            started_at = self._processes.started_at(pid) if pid is not None else None
        # libvirt pauses a domain for a moment while it starts it: that is not a PauseVm.
        paused = state == libvirt.VIR_DOMAIN_PAUSED and reason != libvirt.VIR_DOMAIN_PAUSED_STARTING_UP
        return Runtime(status=status, pid=pid, started_at=started_at, exit_code=exit_code,
                       error=error, cid=meta.cid, paused=paused)  # fmt: skip


def _wait_for_settled_job(domain: _Domain) -> None:
    """Let a running libvirt job (above all libvirtd's reconnect after a restart) finish, briefly.

    destroy does not wait for jobs: killing QEMU while libvirtd is still reconnecting to it
    makes the reconnect fail, and libvirt then records the VM as ended by the daemon ("exited")
    instead of destroyed ("stopped"). The wait is bounded: a hard stop must stay hard.
    """
    deadline = time.monotonic() + JOB_SETTLE_TIMEOUT
    while domain.controlInfo()[0] != libvirt.VIR_DOMAIN_CONTROL_OK and time.monotonic() < deadline:
        time.sleep(0.05)


def _alive(conn: _Connection) -> bool:
    try:
        return bool(conn.isAlive())
    except libvirt.libvirtError:
        return False
