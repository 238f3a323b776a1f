"""UpdateVm / UpgradeApp / ResizeVm: change a VM's definition; it applies at the next StartVm.

Nothing restarts here. What can change:

- ``compose_file`` (must parse), ``encrypted_env`` and ``user_config``: replaced when non-empty;
- ``ports`` (``update_ports``): replaced, with the conflict checks against other VMs and the same
  validation and policy as CreateVm (IPv4 ``host_address``, ``port_mapping.enabled``/``range``).
  dstack skips the policy here, which let UpdateVm add what CreateVm refuses; an empty list
  (clearing the mappings) is always allowed. Every entry needs an explicit ``host_address``;
- ``kms_urls`` / ``gateway_urls`` (``update_*``): replaced; an empty list means the node default;
- ``networks`` (``update_networking``): replaced; empty means the node default;
- ``gpus`` and ``no_tee`` when present;
- ``vcpu``, ``memory``, ``disk_size`` and ``image``: only while the VM is stopped or exited, since
  a running QEMU keeps its size. A field equal to the current value is not a change, so a client
  that always sends the current size can still update a running VM's compose. The disk only
  grows; growing runs ``qemu-img resize`` on ``hda.img`` when the disk exists (a VM that never
  booted gets the new size when the disk is created). A new size or image must hold the image's
  root disk, as at CreateVm.

UpdateVm returns ``sha256(compose)[:40]``, the app id a fresh CreateVm of that compose would get,
when the compose changed, else "". As in dstack, the VM's own ``app_id`` is NOT changed: it is
the identity the KMS derives the app's keys from, and an upgrade keeps the app.

Writing is all or nothing, and the answer always says which (a full disk is the usual way to
fail half-way). An update goes in three steps:

1. **stage**: the new content of each changed file is written and fsynced beside it
   (``.<name>.update``). Every byte the update needs is allocated here;
2. **commit**: a small journal (``.update-pending.json``) naming the staged files is written
   atomically. This is the point of no return;
3. **install**: the staged files are renamed over the old ones, then the journal is removed.

A failure in step 1 or 2 removes what was staged and the journal and reports an error
(``StorageError``, 507): nothing changed, on disk or in memory. After step 2 the call reports
success, because the update will be in effect whatever happens: renames allocate nothing, so a
full disk cannot stop them, and if they fail anyway (an I/O error) or the daemon crashes, the
journal is finished (``finish_pending``) by the next update of the VM, by ReloadVms and at daemon
start. The other design, rolling back after a failed write of the files themselves, needs to
write the old content again, on the disk that just ran out of space: that rollback can fail too,
and leave a mix that is neither the old VM nor the new one, with an answer that matches neither.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from vmm.core.exceptions import BadRequest, Conflict, InvalidField, StorageError
from vmm.core.fsutil import atomic_write, fsync_dir, write_synced
from vmm.model import compose
from vmm.model.manifest import GpuAttachment, Manifest, PortMap
from vmm.model.workdir import SharedFiles, Workdir, shown_path
from vmm.net import nics
from vmm.rpc import vmm_rpc_pb2 as pb
from vmm.vms.request import (
    MAX_USER_CONFIG,
    check_disk_fits_image,
    check_gpus,
    check_networks,
    check_ports,
    check_resources,
    check_urls,
    find_image,
    wanted_nics,
)

if TYPE_CHECKING:
    from vmm.core.config import Config
    from vmm.model.vm import Vm

log = logging.getLogger(__name__)

JOURNAL = ".update-pending.json"


class Registry(Protocol):
    """What an update needs of the VM registry (the Manager provides it)."""

    @property
    def config(self) -> Config: ...
    @property
    def registry_lock(self) -> asyncio.Lock: ...
    def get(self, vm_id: str) -> Vm: ...
    def check_port_conflicts(self, vm_id: str, ports: Iterable[PortMap]) -> None: ...
    def check_capacity(self, vcpu: int, memory_mb: int, exclude: str) -> None: ...
    async def grow_disk(self, vm: Vm, size_gb: int) -> None: ...
RESIZABLE = ("stopped", "exited")


@dataclass(frozen=True)
class UpdateRequest:
    """UpdateVmRequest and ResizeVmRequest in one shape; ``None`` means "leave as is"."""

    id: str
    compose_file: str = ""
    encrypted_env: bytes = b""
    user_config: str = ""
    ports: tuple[pb.PortMapping, ...] | None = None
    kms_urls: tuple[str, ...] | None = None
    gateway_urls: tuple[str, ...] | None = None
    networks: tuple[pb.NetworkingConfig, ...] | None = None
    gpus: pb.GpuConfig | None = None
    no_tee: bool | None = None
    vcpu: int | None = None
    memory: int | None = None
    disk_size: int | None = None
    image: str | None = None


def from_update_vm(request: pb.UpdateVmRequest) -> UpdateRequest:
    if not request.id:
        raise InvalidField("id", "is required")
    return UpdateRequest(
        id=request.id,
        compose_file=request.compose_file,
        encrypted_env=request.encrypted_env,
        user_config=request.user_config,
        ports=tuple(request.ports) if request.update_ports else None,
        kms_urls=tuple(request.kms_urls) if request.update_kms_urls else None,
        gateway_urls=tuple(request.gateway_urls) if request.update_gateway_urls else None,
        networks=tuple(request.networks) if request.update_networking else None,
        gpus=request.gpus if request.HasField("gpus") else None,
        no_tee=request.no_tee if request.HasField("no_tee") else None,
        vcpu=request.vcpu if request.HasField("vcpu") else None,
        memory=request.memory if request.HasField("memory") else None,
        disk_size=request.disk_size if request.HasField("disk_size") else None,
        image=request.image if request.HasField("image") else None,
    )


def from_resize_vm(request: pb.ResizeVmRequest) -> UpdateRequest:
    if not request.id:
        raise InvalidField("id", "is required")
    present = [name for name in ("vcpu", "memory", "disk_size", "image") if request.HasField(name)]
    if not present:
        raise BadRequest("resize request contains no updates (give vcpu, memory, disk_size or image)")
    for name in ("vcpu", "memory", "disk_size"):
        if request.HasField(name) and getattr(request, name) == 0:
            raise InvalidField(name, "must be > 0")
    if request.HasField("image") and not request.image:
        raise InvalidField("image", "must not be empty")
    return UpdateRequest(
        id=request.id,
        vcpu=request.vcpu if request.HasField("vcpu") else None,
        memory=request.memory if request.HasField("memory") else None,
        disk_size=request.disk_size if request.HasField("disk_size") else None,
        image=request.image if request.HasField("image") else None,
    )


@dataclass(frozen=True)
class Plan:
    manifest: Manifest
    shared: SharedFiles
    changed: tuple[str, ...]  # what UpdateVm changed besides the size: "compose", "ports", ...
    resized: tuple[str, ...]  # "vcpu 1 -> 2", ...
    grow_disk: bool
    image_version: str | None
    app_id: str  # what UpdateVm returns


def plan(config: Config, vm: Vm, req: UpdateRequest) -> Plan:
    """Validate ``req`` against ``vm``; no side effects. Cross-VM checks happen in ``apply``."""
    old, shared = vm.manifest, vm.shared
    changed: list[str] = []
    fields: dict[str, object] = {}
    app_id = ""
    new_compose = shared.compose
    if req.compose_file:
        compose.parse_compose(req.compose_file)
        if req.compose_file != shared.compose:
            new_compose = req.compose_file
            app_id = compose.compose_hash(req.compose_file)[:40]
            changed.append("compose")
    new_env = shared.encrypted_env
    if req.encrypted_env and req.encrypted_env != shared.encrypted_env:
        new_env = req.encrypted_env
        changed.append("encrypted_env")
    new_user_config = shared.user_config
    if req.user_config and req.user_config != shared.user_config:
        if len(req.user_config) > MAX_USER_CONFIG:
            raise InvalidField("user_config", f"is larger than {MAX_USER_CONFIG} bytes")
        new_user_config = req.user_config
        changed.append("user_config")

    networks = old.networks
    if req.networks is not None:
        networks = check_networks(config, pb.VmConfiguration(networks=req.networks))
        nics.check_distinct(networks, old.id, config.cvm.networking, "networks")
    if req.ports is not None or req.networks is not None:
        # New networks re-place the kept mappings: one on a NIC that can no longer carry it is
        # refused here, not dropped at the next boot.
        raw = old.port_map
        wanted: list[int | None] = [p.nic for p in old.port_map]
        if req.ports is not None:
            raw = check_ports(config, req.ports, require_address=True)
            wanted = wanted_nics(req.ports)
        ports: tuple[PortMap, ...] = nics.place_ports(raw, wanted, networks,
                                                       config.cvm.networking)
        _set(fields, changed, old, "port_map", ports, label="ports")
    if req.kms_urls is not None:
        _set(fields, changed, old, "kms_urls", check_urls("kms_urls", req.kms_urls))
    if req.gateway_urls is not None:
        _set(fields, changed, old, "gateway_urls",
             check_urls("gateway_urls", req.gateway_urls))
    if req.networks is not None:
        _set(fields, changed, old, "networks", networks)
    if req.gpus is not None:
        gpus: GpuAttachment | None = check_gpus(config, pb.VmConfiguration(gpus=req.gpus))
        _set(fields, changed, old, "gpus", gpus)
    if req.no_tee is not None:
        _set(fields, changed, old, "no_tee", req.no_tee)

    resized: list[str] = []
    vcpu = old.vcpu if req.vcpu is None else req.vcpu
    memory = old.memory if req.memory is None else req.memory
    disk = old.disk_size if req.disk_size is None else req.disk_size
    if disk < old.disk_size:
        raise InvalidField("disk_size", f"cannot shrink disk from {old.disk_size} GB to {disk} GB")
    if (vcpu, memory, disk) != (old.vcpu, old.memory, old.disk_size):
        check_resources(config, vcpu, memory, disk)
    for name, before, after, unit in (("vcpu", old.vcpu, vcpu, ""),
                                      ("memory", old.memory, memory, " MB"),
                                      ("disk_size", old.disk_size, disk, " GB")):
        if before != after:
            fields[name] = after
            resized.append(f"{name} {before}{unit} -> {after}{unit}")
    image_version = None
    if req.image is not None and req.image != old.image:
        image = find_image(config, req.image)
        check_disk_fits_image(image, disk)
        image_version = image.version
        fields["image"] = req.image
        resized.append(f"image {old.image} -> {req.image}")
    elif disk != old.disk_size:
        try:
            current = find_image(config, old.image)
        except InvalidField:
            current = None  # the image is gone; StartVm reports that, a resize need not
        if current is not None:
            check_disk_fits_image(current, disk)

    return Plan(
        manifest=old.evolve(**fields) if fields else old,
        shared=SharedFiles(compose=new_compose, encrypted_env=new_env,
                           user_config=new_user_config),
        changed=tuple(changed),
        resized=tuple(resized),
        grow_disk=disk > old.disk_size,
        image_version=image_version,
        app_id=app_id,
    )


def _set(fields: dict[str, object], changed: list[str], old: Manifest, key: str, value: object,
         *, label: str | None = None) -> None:
    if getattr(old, key) != value:
        fields[key] = value
        changed.append(label or key)


async def apply(registry: Registry, req: UpdateRequest) -> Plan:
    """Check, write (journaled) and cache an update of one VM; return what was done."""
    vm = registry.get(req.id)
    async with vm.lock:
        if vm.removing:
            raise Conflict(f"VM {vm.id} is being removed")
        p = plan(registry.config, vm, req)
        if p.resized and vm.status not in RESIZABLE:
            raise Conflict(f"VM {vm.id} must be stopped before resizing (status: {vm.status})")
        if not p.changed and not p.resized:
            return p
        # The registry's lock: ports and capacity are compared across VMs, so no create or
        # other resize may interleave between the check and the write.
        async with registry.registry_lock:
            if "ports" in p.changed:
                registry.check_port_conflicts(vm.id, p.manifest.port_map)
            if (p.manifest.vcpu, p.manifest.memory) != (vm.manifest.vcpu, vm.manifest.memory):
                registry.check_capacity(p.manifest.vcpu, p.manifest.memory, exclude=vm.id)
            staged = await asyncio.to_thread(stage_update, vm.workdir, p.manifest, p.shared)
            try:
                if p.grow_disk and vm.workdir.disk.exists():
                    # Once the files fit, and before the commit: a crash in between leaves a
                    # disk larger than recorded, which the next resize fixes, never a manifest
                    # promising space the disk lacks.
                    await registry.grow_disk(vm, p.manifest.disk_size)
            except BaseException:
                staged.discard()
                raise
            await asyncio.to_thread(staged.commit)
        vm.manifest, vm.shared = p.manifest, p.shared
        if p.image_version is not None:
            vm.image_version = p.image_version
        if p.resized:
            vm.add_event("vmm.resized", ", ".join(p.resized))
        if p.changed:
            vm.add_event("vmm.updated", ", ".join(p.changed))
    log.info("updated VM %s: %s", vm.id, ", ".join(p.changed + p.resized))
    return p


# -- files ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class StagedUpdate:
    """New files written beside the ones they replace; not in effect until ``commit``."""

    workdir: Workdir
    install: tuple[str, ...]  # paths relative to the work directory, replaced by staged copies
    remove: tuple[str, ...]  # paths relative to the work directory, deleted

    @property
    def journal(self) -> Path:
        return self.workdir.path / JOURNAL

    def write_journal(self) -> None:
        """Step 2: from here on the update is in effect, or will be after a crash."""
        for directory in sorted({(self.workdir.path / name).parent for name in self.install}):
            fsync_dir(directory)  # the staged names must be durable before the journal is
        atomic_write(self.journal, json.dumps({"install": list(self.install),
                                               "remove": list(self.remove)}).encode())

    def commit(self) -> None:
        """Write the journal, then install; raise ``StorageError`` only if nothing changed."""
        if not self.install and not self.remove:
            return
        try:
            self.write_journal()
        except OSError as exc:
            # Also when only the journal's directory fsync failed: the journal is there then,
            # but the call reports failure, so the update must not be replayed.
            with contextlib.suppress(OSError):
                self.journal.unlink(missing_ok=True)
            self.discard()
            failed = Path(os.fsdecode(exc.filename)) if exc.filename else self.journal
            raise _storage_error(exc, self.workdir, failed) from exc
        try:
            _install(self.workdir, self.install, self.remove)
        except OSError:
            log.exception("VM %s: the update is committed but not yet in place; it is finished "
                          "by the next update, ReloadVms or daemon start", self.workdir.id)

    def discard(self) -> None:
        for name in self.install:
            with contextlib.suppress(OSError):
                _staged(self.workdir.path / name).unlink(missing_ok=True)


def stage_update(workdir: Workdir, manifest: Manifest, shared: SharedFiles) -> StagedUpdate:
    """Step 1: write the new content of every file that changes beside it.

    Raises ``StorageError`` (nothing changed) when a file cannot be written, a full disk say.
    """
    try:
        finish_pending(workdir)  # an earlier committed update goes in before this one
    except OSError as exc:
        raise _storage_error(exc, workdir, workdir.path) from exc
    install: list[str] = []
    remove: list[str] = []
    for target, data in _new_contents(workdir, manifest, shared).items():
        name = str(target.relative_to(workdir.path))
        try:
            if data == _read_or_none(target):
                continue
            if data is None:
                remove.append(name)
                continue
            target.parent.mkdir(exist_ok=True)
            write_synced(_staged(target), data)
        except OSError as exc:
            StagedUpdate(workdir, tuple(install), ()).discard()
            raise _storage_error(exc, workdir, target) from exc
        install.append(name)
    return StagedUpdate(workdir, tuple(install), tuple(remove))


def write_update(workdir: Workdir, manifest: Manifest, shared: SharedFiles) -> None:
    """Write manifest and shared files: all in effect, or ``StorageError`` and nothing changed."""
    stage_update(workdir, manifest, shared).commit()


def finish_pending(workdir: Workdir) -> bool:
    """Finish a committed update a crash or an I/O error interrupted; True if there was one.

    Without a journal, staged files are leftovers of an update that never committed: removed.
    """
    try:
        install, remove = _read_journal(workdir)
    except FileNotFoundError:
        _discard_leftovers(workdir)
        return False
    except (OSError, ValueError) as exc:
        # The journal is written atomically, so this is damage from outside.
        log.warning("ignoring unreadable update journal %s: %s", workdir.path / JOURNAL, exc)
        (workdir.path / JOURNAL).unlink(missing_ok=True)
        _discard_leftovers(workdir)
        return False
    _install(workdir, install, remove)
    log.info("finished an interrupted update of VM %s", workdir.id)
    return True


def _updated_files(workdir: Workdir) -> tuple[Path, ...]:
    """The files an update writes; the manifest last, so it goes in after what it describes."""
    return (workdir.compose, workdir.encrypted_env, workdir.user_config, workdir.manifest)


def _new_contents(workdir: Workdir, manifest: Manifest,
                  shared: SharedFiles) -> dict[Path, bytes | None]:
    """Each file an update writes and its new content (None: the file is removed)."""
    contents = (shared.compose.encode(), shared.encrypted_env or None,
                shared.user_config.encode() or None, manifest.dumps())
    return dict(zip(_updated_files(workdir), contents, strict=True))


def _read_or_none(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def _staged(target: Path) -> Path:
    return target.with_name(f".{target.name}.update")


def _read_journal(workdir: Workdir) -> tuple[tuple[str, ...], tuple[str, ...]]:
    data = json.loads((workdir.path / JOURNAL).read_bytes())
    if not isinstance(data, dict):
        raise ValueError("the journal is not a JSON object")
    # Only the files an update writes: the journal never names a path outside the VM.
    known = {str(path.relative_to(workdir.path)) for path in _updated_files(workdir)}
    found: list[tuple[str, ...]] = []
    for key in ("install", "remove"):
        names = data.get(key)
        if not isinstance(names, list) or not all(
                isinstance(name, str) and name in known for name in names):
            raise ValueError(f"`{key}` must list files of {sorted(known)}")
        found.append(tuple(names))
    return found[0], found[1]


def _install(workdir: Workdir, install: tuple[str, ...], remove: tuple[str, ...]) -> None:
    """Step 3, also the replay after a crash: renames and deletes only, so it needs no space."""
    for name in install:
        target = workdir.path / name
        with contextlib.suppress(FileNotFoundError):  # no staged copy: installed before a crash
            _staged(target).replace(target)
    for name in remove:
        (workdir.path / name).unlink(missing_ok=True)
    for directory in sorted({(workdir.path / name).parent for name in install + remove}):
        fsync_dir(directory)
    (workdir.path / JOURNAL).unlink()
    fsync_dir(workdir.path)


def _discard_leftovers(workdir: Workdir) -> None:
    for target in _updated_files(workdir):
        _staged(target).unlink(missing_ok=True)


def _storage_error(exc: OSError, workdir: Workdir, path: Path) -> StorageError:
    return StorageError.of(exc, shown_path(workdir.path.parent, path))
