"""Checking a CreateVm request and turning it into a manifest and shared files.

Every check raises ``InvalidField`` naming the request field and the reason; port conflicts
with other VMs are checked by the manager, which knows them (``port_conflicts``).
"""

from __future__ import annotations

import ipaddress
import time
import uuid
from collections.abc import Iterable
from pathlib import Path

from vmm.core.config import Config
from vmm.core.exceptions import InvalidField, NotFound
from vmm.core.names import IFNAME, check_name
from vmm.model import compose
from vmm.model.images import Image, ImageError, load_image, root_disk_size
from vmm.model.manifest import GpuAttachment, GpuSpec, Manifest, Network, PortMap
from vmm.model.workdir import SharedFiles
from vmm.net import nics, passt
from vmm.rpc import vmm_rpc_pb2 as pb

MAX_USER_CONFIG = 1024 * 1024
# Modes a client may ask for; custom is a raw -netdev from config only (as dstack refuses it).
RPC_MODES = ("user", "bridge", "passt")
GIB = 1024**3


def check_resources(config: Config, vcpu: int, memory: int, disk_size: int, prefix: str = "") -> None:
    cvm = config.cvm
    if not 1 <= vcpu <= cvm.max_allocable_vcpu:
        raise InvalidField(
            f"{prefix}vcpu", f"must be 1..{cvm.max_allocable_vcpu} (cvm.max_allocable_vcpu), got {vcpu}"
        )
    if not cvm.min_memory_mb <= memory <= cvm.max_allocable_memory_in_mb:
        raise InvalidField(
            f"{prefix}memory",
            f"must be {cvm.min_memory_mb}..{cvm.max_allocable_memory_in_mb} MB, got {memory}",
        )
    if not 1 <= disk_size <= cvm.max_disk_size_gb:
        raise InvalidField(
            f"{prefix}disk_size", f"must be 1..{cvm.max_disk_size_gb} GB, got {disk_size}"
        )


def find_image(config: Config, name: str, field: str = "image") -> Image:
    try:
        return load_image(Path(config.image.path), name)
    except NotFound:
        raise InvalidField(field, f"no image named {name!r} (see ListImages)") from None
    except ImageError as exc:
        raise InvalidField(field, exc.message) from None


def check_ports(
    config: Config, ports: Iterable[pb.PortMapping], *, require_address: bool = False
) -> tuple[PortMap, ...]:
    """Validate mappings and apply the host's policy (enabled, ranges), for CreateVm and UpdateVm.

    ``require_address`` keeps dstack's UpdateVm rule that every entry names its host address;
    otherwise an empty one means ``cvm.port_mapping.address``. An empty list is always allowed.
    Each mapping keeps NIC 0 here; ``place_ports`` then puts it on the NIC it asks for.
    """
    mapping = config.cvm.port_mapping
    result: list[PortMap] = []
    for i, port in enumerate(ports):
        where = f"ports[{i}]"
        protocol = port.protocol or "tcp"
        if protocol not in ("tcp", "udp"):
            raise InvalidField(f"{where}.protocol", f"must be tcp or udp, got {port.protocol!r}")
        for name, value in (("host_port", port.host_port), ("vm_port", port.vm_port)):
            if not 1 <= value <= 65535:
                raise InvalidField(f"{where}.{name}", f"must be 1..65535, got {value}")
        if require_address and not port.host_address:
            raise InvalidField(f"{where}.host_address", "Invalid host address: empty")
        address = check_host_address(port.host_address, mapping.address, f"{where}.host_address")
        if not mapping.enabled:
            raise InvalidField("ports", "port mapping is disabled (cvm.port_mapping.enabled)")
        if not any(
            r.protocol == protocol and r.from_port <= port.host_port <= r.to_port
            for r in mapping.range
        ):
            allowed = ", ".join(f"{r.protocol} {r.from_port}-{r.to_port}" for r in mapping.range)
            raise InvalidField(
                f"{where}.host_port",
                f"port mapping is not allowed for {protocol}:{port.host_port} (allowed: {allowed})",
            )
        candidate = PortMap(protocol, port.host_port, port.vm_port, address)  # type: ignore[arg-type]
        for j, other in enumerate(result):
            if ports_clash(candidate, other):
                raise InvalidField(where, f"duplicates ports[{j}] ({describe_port(other)})")
        result.append(candidate)
    return tuple(result)


def wanted_nics(ports: Iterable[pb.PortMapping]) -> list[int | None]:
    """The NIC each mapping names (``nic``, an extension), None where it names none."""
    return [port.nic if port.HasField("nic") else None for port in ports]


def check_host_address(address: str, default: str, field: str) -> str:
    """``address`` (or ``default`` when empty) if it is a plain IPv4 literal; else InvalidField.

    The address lands inside QEMU's ``-netdev user,...`` option list. IPv6 is refused outright:
    QEMU 7.2 cannot forward it, and an IPv6 scope id may hold any text, commas included, so
    ``::1%x,guestfwd=...-cmd:...`` would add an option that runs a host command.
    """
    chosen = address or default
    try:
        ipaddress.IPv4Address(chosen)
    except ValueError:
        shown = repr(chosen[:80]) + ("..." if len(chosen) > 80 else "")
        source = "" if address else " (the default, cvm.port_mapping.address)"
        raise InvalidField(
            field, f"{shown}{source} is not an IPv4 address (only IPv4 can be forwarded)"
        ) from None
    return chosen


def ports_clash(a: PortMap, b: PortMap) -> bool:
    if a.protocol != b.protocol or a.host_port != b.host_port:
        return False
    wildcard = ("0.0.0.0", "::", "")
    return a.address == b.address or a.address in wildcard or b.address in wildcard


def describe_port(port: PortMap) -> str:
    return f"{port.protocol} {port.address}:{port.host_port} -> {port.vm_port}"


def check_urls(field: str, urls: Iterable[str]) -> tuple[str, ...]:
    result = []
    for i, url in enumerate(urls):
        if not url.startswith(("http://", "https://")) or len(url) < 10:
            raise InvalidField(f"{field}[{i}]", f"{url!r} is not an http(s) URL")
        result.append(url)
    return tuple(result)


def check_gpus(config: Config, request: pb.VmConfiguration) -> GpuAttachment | None:
    if not request.HasField("gpus"):
        return None
    gpus = request.gpus
    if not gpus.gpus and gpus.attach_mode in ("", "listed"):
        return None
    if not config.cvm.gpu.enabled:
        raise InvalidField("gpus", "GPU passthrough is not enabled (cvm.gpu.enabled = false)")
    if gpus.attach_mode not in ("listed", "all"):
        raise InvalidField("gpus.attach_mode", f"must be listed or all, got {gpus.attach_mode!r}")
    if gpus.attach_mode == "all" and not config.cvm.gpu.allow_attach_all:
        raise InvalidField("gpus.attach_mode", "attaching all GPUs is not allowed")
    specs = []
    for i, spec in enumerate(gpus.gpus):
        if not spec.slot or not all(c in "0123456789abcdefABCDEF:." for c in spec.slot):
            raise InvalidField(f"gpus.gpus[{i}].slot", f"{spec.slot!r} is not a PCI slot")
        specs.append(GpuSpec(spec.slot))
    return GpuAttachment(attach_mode=gpus.attach_mode, gpus=tuple(specs))  # type: ignore[arg-type]


def check_networks(config: Config, request: pb.VmConfiguration) -> tuple[Network, ...]:
    entries = list(request.networks)
    field = "networks"
    if not entries and request.HasField("networking"):
        entries, field = [request.networking], "networking"
    result: list[Network] = []
    for i, entry in enumerate(entries):
        where = f"{field}[{i}]" if field == "networks" else field
        if entry.mode not in RPC_MODES:
            modes = " or ".join(RPC_MODES)
            raise InvalidField(f"{where}.mode", f"must be {modes}, got {entry.mode!r}")
        if entry.bridge_name and entry.mode != "bridge":
            raise InvalidField(f"{where}.bridge_name", "is only allowed with mode bridge")
        if entry.bridge_name:
            # The name rule first: the name is then one interface name, never a path to probe.
            bridge = check_name(entry.bridge_name, f"{where}.bridge_name", IFNAME)
            if not is_bridge(bridge):
                raise InvalidField(f"{where}.bridge_name", f"no bridge {bridge!r} on this host")
        elif entry.mode == "bridge" and not config.cvm.networking.bridge:
            raise InvalidField(f"{where}.bridge_name",
                               "is required: this host has no default (cvm.networking.bridge)")
        if entry.mode == "passt":
            if not passt.passt_binary():
                raise InvalidField(f"{where}.mode", "passt is not installed on this host")
            if any(n.mode == "passt" for n in result):
                raise InvalidField(f"{where}.mode", "a VM has at most one passt NIC")
        mac = nics.check_mac(entry.mac, f"{where}.mac") if entry.mac else ""
        result.append(Network(mode=entry.mode, bridge=entry.bridge_name, mac=mac))  # type: ignore[arg-type]
    return tuple(result)


def is_bridge(ifname: str) -> bool:
    """Whether ``ifname`` (already a checked interface name) is a bridge on this host."""
    # A missing interface and one that is not a bridge get the same answer.
    return Path("/sys/class/net", ifname, "bridge").is_dir()


def check_disk_fits_image(image: Image, disk_size: int, field: str = "disk_size") -> None:
    """Refuse a disk smaller than the image's root disk: the guest could not mount its root.

    The VM's hda.img is a qcow2 overlay on the image's hda, so ``disk_size`` GiB is what the
    guest sees; below the root disk's size the filesystem is cut short.
    """
    try:
        root = root_disk_size(image)
    except ImageError as exc:
        raise InvalidField("image", exc.message) from None
    if root is None:
        return
    minimum = -(-root // GIB)
    if disk_size < minimum:
        raise InvalidField(
            field,
            f"must be at least {minimum} GiB for image {image.name!r}, whose root disk is "
            f"{root / GIB:.2f} GiB; got {disk_size}",
        )


def build_vm(config: Config, request: pb.VmConfiguration) -> tuple[Manifest, SharedFiles, Image]:
    """Validate a CreateVm request; return the manifest, shared files and image to use."""
    compose.validate_name(request.name)
    image = find_image(config, request.image)
    compose.parse_compose(request.compose_file)
    check_resources(config, request.vcpu, request.memory, request.disk_size)
    check_disk_fits_image(image, request.disk_size)
    ports = check_ports(config, request.ports)
    networks = check_networks(config, request)
    vm_id = str(uuid.uuid4())
    nics.check_distinct(networks, vm_id, config.cvm.networking, "networks")
    ports = nics.place_ports(ports, wanted_nics(request.ports), networks, config.cvm.networking)
    if request.HasField("simulated_tee") and request.simulated_tee:
        raise InvalidField("simulated_tee", "no TEE simulator is configured on this host")
    if len(request.user_config) > MAX_USER_CONFIG:
        raise InvalidField("user_config", f"is larger than {MAX_USER_CONFIG} bytes")
    manifest = Manifest(
        id=vm_id,
        name=request.name,
        app_id=compose.app_id_for(
            request.compose_file, request.app_id if request.HasField("app_id") else None
        ),
        image=request.image,
        vcpu=request.vcpu,
        memory=request.memory,
        disk_size=request.disk_size,
        created_at_ms=int(time.time() * 1000),
        port_map=ports,
        hugepages=request.hugepages,
        pin_numa=request.pin_numa,
        gpus=check_gpus(config, request),
        kms_urls=check_urls("kms_urls", request.kms_urls),
        gateway_urls=check_urls("gateway_urls", request.gateway_urls),
        no_tee=request.no_tee,
        networks=networks,
    )
    shared = SharedFiles(
        compose=request.compose_file,
        encrypted_env=request.encrypted_env,
        user_config=request.user_config,
    )
    return manifest, shared, image
