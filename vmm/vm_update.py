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

Crash safety: the new manifest and shared files are first written together to a journal
(``.update-pending.json``, atomically) and then to their own files; the journal is removed
last. At daemon start a journal left by a crash is rolled forward (``finish_pending``), so a
reader never sees the new compose with the old manifest or the reverse.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vmm import compose, limits
from vmm.exceptions import BadRequest, Conflict, InvalidField
from vmm.fsutil import atomic_write, fsync_dir
from vmm.manifest import GpuAttachment, Manifest, ManifestError, Network, PortMap
from vmm.rpc import vmm_rpc_pb2 as pb
from vmm.vm_request import (
    MAX_USER_CONFIG,
    check_disk_fits_image,
    check_gpus,
    check_networks,
    check_ports,
    check_resources,
    check_urls,
    find_image,
)
from vmm.workdir import SharedFiles, Workdir

if TYPE_CHECKING:
    from vmm.config import Config
    from vmm.manager import Manager
    from vmm.vm import Vm

log = logging.getLogger(__name__)

JOURNAL = ".update-pending.json"
QEMU_IMG_TIMEOUT = 120.0
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

    if req.ports is not None:
        ports: tuple[PortMap, ...] = check_ports(config, req.ports, require_address=True)
        _set(fields, changed, old, "port_map", ports, label="ports")
    if req.kms_urls is not None:
        _set(fields, changed, old, "kms_urls", check_urls("kms_urls", req.kms_urls))
    if req.gateway_urls is not None:
        _set(fields, changed, old, "gateway_urls",
             check_urls("gateway_urls", req.gateway_urls))
    if req.networks is not None:
        networks: tuple[Network, ...] = check_networks(pb.VmConfiguration(networks=req.networks))
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


async def apply(manager: Manager, req: UpdateRequest) -> Plan:
    """Check, write (journaled) and cache an update of one VM; return what was done."""
    # Uses the manager's lock and checks directly: this module is the manager's update path,
    # kept apart so the lifecycle module stays readable.
    from vmm.manager import _run  # noqa: PLC0415  # the manager imports this module's users

    vm = manager.get(req.id)
    async with vm.lock:
        if vm.removing:
            raise Conflict(f"VM {vm.id} is being removed")
        p = plan(manager.config, vm, req)
        if p.resized and vm.status not in RESIZABLE:
            raise Conflict(f"VM {vm.id} must be stopped before resizing (status: {vm.status})")
        if not p.changed and not p.resized:
            return p
        # The manager's create lock: ports and capacity are compared across VMs, so no create
        # or other resize may interleave between the check and the write.
        async with manager._create_lock:
            if "ports" in p.changed:
                manager._check_port_conflicts(vm.id, p.manifest.port_map)
            if (p.manifest.vcpu, p.manifest.memory) != (vm.manifest.vcpu, vm.manifest.memory):
                limits.check_fits(manager.config, manager.vms.values(), vcpu=p.manifest.vcpu,
                                  memory_mb=p.manifest.memory, exclude=vm.id)
            if p.grow_disk and vm.workdir.disk.exists():
                # Before the manifest: a crash in between leaves a disk larger than recorded,
                # which the next resize fixes, never a manifest promising space the disk lacks.
                await _run(["qemu-img", "resize", str(vm.workdir.disk),
                            f"{p.manifest.disk_size}G"], QEMU_IMG_TIMEOUT)
            await asyncio.to_thread(write_update, vm.workdir, p.manifest, p.shared)
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


def write_update(workdir: Workdir, manifest: Manifest, shared: SharedFiles) -> None:
    """Write manifest and shared files so that a crash leaves all old or (after recovery) all new."""
    journal = workdir.path / JOURNAL
    atomic_write(journal, json.dumps({
        "manifest": manifest.to_json(),
        "compose": shared.compose,
        "encrypted_env": shared.encrypted_env.hex(),
        "user_config": shared.user_config,
    }).encode())
    _apply(workdir, manifest, shared)
    journal.unlink()
    fsync_dir(workdir.path)


def _apply(workdir: Workdir, manifest: Manifest, shared: SharedFiles) -> None:
    workdir.write_shared(shared)
    workdir.write_manifest(manifest)


def finish_pending(workdir: Workdir) -> bool:
    """Roll forward an update a crash interrupted; True if there was one to finish."""
    journal = workdir.path / JOURNAL
    try:
        data = json.loads(journal.read_bytes())
        manifest = Manifest.from_json(data["manifest"])
        shared = SharedFiles(compose=data["compose"],
                             encrypted_env=bytes.fromhex(data["encrypted_env"]),
                             user_config=data["user_config"])
    except FileNotFoundError:
        return False
    except (OSError, ValueError, KeyError, TypeError, ManifestError) as exc:
        # The journal is written atomically, so this is damage from outside; the files it
        # would have replaced are still the complete previous version.
        log.warning("ignoring unreadable update journal %s: %s", journal, exc)
        journal.unlink(missing_ok=True)
        return False
    if manifest.id != workdir.id:
        log.warning("ignoring update journal %s: it is for VM %r", journal, manifest.id)
        journal.unlink(missing_ok=True)
        return False
    _apply(workdir, manifest, shared)
    journal.unlink()
    fsync_dir(workdir.path)
    log.info("finished an update of VM %s interrupted by a crash", workdir.id)
    return True
