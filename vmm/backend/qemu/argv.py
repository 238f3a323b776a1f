"""The QEMU command line of one VM, as a pure function of the launch facts (reference §10).

``build_qemu_argv`` reads no files and runs nothing: every fact (host capabilities, GPU NUMA
nodes, CPU lists, the compose hash) comes in through ``LaunchSpec`` and ``Config``, so the argv
is pinned by golden tests even for TDX and SEV-SNP, which cannot boot on a TCG test machine.
The groups follow §10 in order; these differences are deliberate:

- ``-accel <host.accel> -cpu <host.cpu_model>`` instead of the hard-coded ``-accel kvm -cpu host``:
  under TCG ``-cpu host`` is refused, and host.py already picks EPYC-v4 for SEV-SNP.
- The guest channel takes the vsock slot (§10 item 6). With ``host.channel == "serial"``
  (no /dev/vhost-vsock) it is a virtio-serial controller with two ports backed by per-VM Unix
  sockets: AGENT_SOCKET/AGENT_PORT_NAME (host → guest agent) and HOST_API_SOCKET/HOST_API_PORT_NAME
  (guest → host API).
- ``-machine q35,kernel-irqchip=split,hpet=off`` is kept under TCG too: QEMU 7.2 accepts it there
  (kernel-irqchip is a KVM accelerator property that TCG ignores), so no TCG special case.
- hostfwd: an empty ``PortMap.address`` means ``cvm.port_mapping.address``; an IPv6 host address
  is bracketed (``tcp:[::1]:8080-:80``). QEMU 7.2 itself refuses IPv6 hostfwd ("Bad host
  address"); newer QEMU accepts the bracketed form. The manifest's port_map is applied as
  stored: whether mappings are allowed at all is decided when they are set (CreateVm, UpdateVm).
  The hostfwd pieces are not comma-escaped, so anything but an IP literal, tcp|udp and port
  numbers is refused with a ValueError instead of being written into the option list.
- Commas inside option values (paths, SMBIOS strings) are doubled, as QEMU's option parser
  requires; §10 strings without commas are unchanged.
- TDX: ``quote-generation-socket`` is included unless ``cvm.qgs_port`` is 0.
- SEV-SNP ``host-data`` is base64(sha256(compose hash bytes)): a simplification, since MrConfigV3
  documents (``sha256(DOMAIN||00||document)``) are out of scope here.
- The virtio suffix of SEV-SNP is appended to every ``-device`` virtio PCI string (block, net,
  vsock, virtio-serial). ``-virtfs`` creates its PCI device implicitly and takes no suffix.
- GPUs are passed through only when ``cvm.gpu.enabled`` (as dstack does at launch); the caller
  resolves "all" to slots. The bridge libvirt-nwfilter TAP variant is not built.
- Hugepages: the guest NUMA nodes are the distinct host nodes of the GPUs in ascending order;
  memory is ceil(MB / 1024) GiB rounded up to a multiple of the node count, and ``-m`` is that
  total, because QEMU requires the NUMA memdevs to add up to the RAM size.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vmm.backend.base import LaunchSpec
from vmm.core.config import Config, CvmConfig, ProductConfig
from vmm.host.capabilities import Tee
from vmm.model.manifest import PortMap
from vmm.model.workdir import AGENT_SOCKET, DISK, HOST_API_SOCKET, QMP_SOCKET
from vmm.net.nics import ResolvedNic
from vmm.net.passt import socket_path as passt_socket

AGENT_PORT_NAME = "org.vmm.guest-agent"
HOST_API_PORT_NAME = "org.vmm.host-api"

_SNP_VIRTIO_SUFFIX = ",disable-legacy=on,iommu_platform=true"
_MRCONFIGID_MIN_VERSION = (0, 5, 2)
_MRCONFIGID_LEN = 48
_PCI_SLOT = re.compile(r"^[0-9A-Fa-f:.]+$")
_COMPOSE_HASH = re.compile(r"^[0-9a-f]{64}$")
_IP_LITERAL_CHARS = re.compile(r"[0-9A-Fa-f.:]+")


@dataclass(frozen=True)
class Sizing:
    """The guest's vCPUs and memory after NUMA rounding (shared with the libvirt domain)."""

    vcpus: int
    memory_mb: int
    nodes: tuple[tuple[int, int], ...]  # hugepages only: (host node, GPUs on it) per guest node


def effective_tee(spec: LaunchSpec) -> Tee:
    """The TEE this VM runs under: the host's, unless the manifest asks for none."""
    return "none" if spec.manifest.no_tee else spec.host.tee


def mrconfigid_v1(compose_hash: str) -> str:
    """TDX mrconfigid V1: base64(0x01 || compose hash || zeros) over 48 bytes."""
    raw = b"\x01" + _compose_hash_bytes(compose_hash)
    return base64.b64encode(raw.ljust(_MRCONFIGID_LEN, b"\0")).decode()


def snp_host_data(compose_hash: str) -> str:
    """SEV-SNP host-data: base64(sha256(compose hash bytes)), 32 bytes."""
    return base64.b64encode(hashlib.sha256(_compose_hash_bytes(compose_hash)).digest()).decode()


def build_qemu_argv(spec: LaunchSpec, config: Config) -> list[str]:
    """The full argv; argv[0] is sudo, taskset or the QEMU binary."""
    if not spec.workdir.is_absolute():
        raise ValueError(f"the VM work directory must be absolute: {spec.workdir}")
    if not spec.host.qemu_path:
        raise ValueError("no QEMU binary: set cvm.qemu_path or install qemu-system-x86_64")
    cvm = config.cvm
    tee = effective_tee(spec)
    snp = tee == "sev-snp"
    gpus = spec.gpu_slots if cvm.gpu.enabled else ()
    bridges = spec.bridge_slots if cvm.gpu.enabled else ()
    for slot in (*gpus, *bridges):
        if not _PCI_SLOT.match(slot):
            raise ValueError(f"bad PCI slot {slot!r}: only hex digits, ':' and '.' are allowed")
    sizing = size_guest(spec, gpus)
    argv = _command_prefix(spec, cvm, gpus)
    argv += _base(spec)
    argv += _firmware(spec, cvm, snp)
    argv += _disks(spec, snp)
    argv += _nics(spec, config, snp)
    argv += _smbios(cvm.product)
    if spec.manifest.swtpm:
        argv += _swtpm(spec.workdir)
    argv += _guest_channel(spec, snp)
    argv += _host_share(spec, cvm, snp)
    argv += _numa(sizing)
    argv += _machine(spec, cvm, tee, sizing)
    argv += _gpus(gpus, bridges, spec.numa_node_of, hugepages=bool(sizing.nodes))
    argv += ["-smp", str(sizing.vcpus), "-m", f"{sizing.memory_mb}M"]
    if spec.image.cmdline:
        argv += ["-append", spec.image.cmdline]
    return argv


def _opt(value: object) -> str:
    # QEMU option lists split on ","; a literal comma is written ",,".
    return str(value).replace(",", ",,")


def _virtio(device: str, snp: bool) -> str:
    return device + _SNP_VIRTIO_SUFFIX if snp else device


def _compose_hash_bytes(compose_hash: str) -> bytes:
    if not _COMPOSE_HASH.match(compose_hash):
        raise ValueError(f"compose hash must be 64 lowercase hex digits, got {compose_hash!r}")
    return bytes.fromhex(compose_hash)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def size_guest(spec: LaunchSpec, gpus: tuple[str, ...]) -> Sizing:
    vcpus = max(1, spec.manifest.vcpu)
    if not spec.manifest.hugepages:
        return Sizing(vcpus, spec.manifest.memory, ())
    per_node = Counter(spec.numa_node_of(slot) for slot in gpus) or Counter({0: 0})
    nodes = tuple(sorted(per_node.items()))
    n = len(nodes)
    mem_gib = _round_up(max(1, _round_up(spec.manifest.memory, 1024) // 1024), n)
    return Sizing(_round_up(vcpus, n), mem_gib * 1024, nodes)


def _command_prefix(spec: LaunchSpec, cvm: CvmConfig, gpus: tuple[str, ...]) -> list[str]:
    argv = []
    if cvm.user:
        argv += ["sudo", "-u", cvm.user]
    if spec.manifest.pin_numa:
        node = spec.numa_node_of(gpus[0]) if gpus else 0
        argv += ["taskset", "-c", spec.node_cpulist(node)]
    return [*argv, spec.host.qemu_path]


def _base(spec: LaunchSpec) -> list[str]:
    wd = spec.workdir
    return [
        "-accel", spec.host.accel, "-cpu", spec.host.cpu_model, "-nographic", "-nodefaults",
        "-chardev",
        f"pty,id=com0,path={_opt(wd / 'serial.pty')},logfile={_opt(wd / 'serial.log')},"
        "logappend=on",
        "-serial", "chardev:com0",
    ]  # fmt: skip


def _firmware(spec: LaunchSpec, cvm: CvmConfig, snp: bool) -> list[str]:
    argv = []
    if cvm.qmp_socket:
        argv += ["-qmp", f"unix:{_opt(spec.workdir / QMP_SOCKET)},server,wait=off"]
    bios = (spec.image.bios_sev or spec.image.bios) if snp else spec.image.bios
    if bios is not None:
        argv += ["-bios", str(bios)]
    argv += ["-kernel", str(spec.image.kernel), "-initrd", str(spec.image.initrd)]
    if cvm.qemu_hotplug_off:
        argv += ["-global", "ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off"]
    if cvm.qemu_pci_hole64_size > 0:
        argv += ["-global", f"q35-pcihost.pci-hole64-size=0x{cvm.qemu_pci_hole64_size:x}"]
    return argv


def verity_rootfs(spec: LaunchSpec) -> Path | None:
    """The image's read-only root filesystem, which must be dm-verity (``*.verity``), or None."""
    rootfs = spec.image.rootfs
    if rootfs is not None and rootfs.suffix != ".verity":
        raise ValueError(
            f"image {spec.image.name!r}: unsupported rootfs {rootfs.name!r}"
            " (only a dm-verity '*.verity' rootfs is supported; ISO rootfs needs image < 0.5.0)"
        )
    return rootfs


def _disks(spec: LaunchSpec, snp: bool) -> list[str]:
    argv = []
    rootfs = verity_rootfs(spec)
    if rootfs is not None:
        argv += [
            "-drive", f"file={_opt(rootfs)},if=none,id=hd0,format=raw,readonly=on",
            "-device", _virtio("virtio-blk-pci,drive=hd0", snp),
        ]  # fmt: skip
    argv += [
        "-drive", f"file={_opt(spec.workdir / DISK)},if=none,id=hd1",
        "-device", _virtio("virtio-blk-pci,drive=hd1", snp),
    ]  # fmt: skip
    for i, source in enumerate(spec.manifest.volumes):
        argv += [
            "-drive", f"file={_opt(source)},if=none,id=vol{i},format=raw,readonly=on",
            "-device", _virtio(f"virtio-blk-pci,drive=vol{i}", snp),
        ]  # fmt: skip
    return argv


def hostfwd(mapping: PortMap, default_address: str) -> str:
    """One ``hostfwd=`` option of the user netdev; a piece that could end it is refused.

    The pieces are not comma-escaped (``,,`` is no valid address or port), so each must be
    plain: otherwise ``,guestfwd=...-cmd:...`` in an address would run a host command.
    """
    address = mapping.address or default_address
    if not _is_ip_literal(address):
        raise ValueError(f"hostfwd address {address!r} is not a plain IP address literal")
    if mapping.protocol not in ("tcp", "udp"):
        raise ValueError(f"hostfwd protocol {mapping.protocol!r} is not tcp or udp")
    # Host port 0 asks for any free port; bool is an int subclass, and no port.
    for what, port, lowest in (("host port", mapping.host_port, 0),
                               ("VM port", mapping.vm_port, 1)):
        if type(port) is not int or not lowest <= port <= 65535:
            raise ValueError(f"hostfwd {what} {port!r} is not a port number {lowest}..65535")
    if ":" in address:
        address = f"[{address}]"
    return f"hostfwd={mapping.protocol}:{address}:{mapping.host_port}-:{mapping.vm_port}"


def _is_ip_literal(address: str) -> bool:
    if not _IP_LITERAL_CHARS.fullmatch(address):  # also no IPv6 scope id: it may hold anything
        return False
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return False
    return True


def _nics(spec: LaunchSpec, config: Config, snp: bool) -> list[str]:
    argv: list[str] = []
    for nic in spec.resolved_nics(config.cvm.networking):
        argv += [
            "-netdev", netdev_option(nic, config.cvm.port_mapping.address, spec.workdir),
            "-device", _virtio(f"virtio-net-pci,netdev={nic.netdev_id},mac={nic.mac}", snp),
        ]  # fmt: skip
    return argv


def netdev_option(nic: ResolvedNic, default_address: str, workdir: Path) -> str:
    """The ``-netdev`` value of one NIC (shared with the libvirt domain's injected NICs).

    Each user NIC carries the hostfwd of the mappings placed on it (``ResolvedNic.ports``);
    which NIC may carry which mapping was decided when the mapping was set.
    """
    if nic.mode == "user":
        netdev = (
            f"user,id={nic.netdev_id},net={nic.net},dhcpstart={nic.dhcp_start},"
            f"restrict={'yes' if nic.restrict else 'no'}"
        )
        return netdev + "".join("," + hostfwd(p, default_address) for p in nic.ports)
    if nic.mode == "passt":
        # passt (started beside QEMU, vmm.net.passt) serves this socket and does the forwards.
        path = _opt(passt_socket(workdir))
        return f"stream,id={nic.netdev_id},server=off,addr.type=unix,addr.path={path}"
    if nic.mode == "bridge":
        # The daemon made the TAP and put it on the bridge (vmm.net.tap): no helper scripts.
        return f"tap,id={nic.netdev_id},ifname={nic.tap},script=no,downscript=no"
    return nic.netdev


_SMBIOS_FIELDS: tuple[tuple[int, tuple[tuple[str, str], ...]], ...] = (
    (0, (("vendor", "bios_vendor"), ("version", "bios_version"), ("date", "bios_date"),
         ("release", "bios_release"))),
    (1, (("manufacturer", "sys_vendor"), ("product", "product_name"),
         ("version", "product_version"), ("serial", "product_serial"),
         ("uuid", "product_uuid"), ("family", "product_family"), ("sku", "product_sku"))),
    (2, (("manufacturer", "board_vendor"), ("product", "board_name"),
         ("version", "board_version"), ("serial", "board_serial"),
         ("asset", "board_asset_tag"))),
    (3, (("manufacturer", "chassis_vendor"), ("version", "chassis_version"),
         ("serial", "chassis_serial"), ("asset", "chassis_asset_tag"))),
)  # fmt: skip


def _smbios(product: ProductConfig) -> list[str]:
    argv = []
    for smbios_type, fields in _SMBIOS_FIELDS:
        pairs = [(key, getattr(product, attr)) for key, attr in fields]
        values = "".join(f",{key}={_opt(value)}" for key, value in pairs if value)
        if values:
            argv += ["-smbios", f"type={smbios_type}{values}"]
    return argv


def _swtpm(wd: Path) -> list[str]:
    return [
        "-chardev", f"socket,id=chrtpm,path={_opt(wd / 'swtpm' / 'swtpm.sock')}",
        "-tpmdev", "emulator,id=tpm0,chardev=chrtpm",
        "-device", "tpm-tis,tpmdev=tpm0",
    ]  # fmt: skip


def _guest_channel(spec: LaunchSpec, snp: bool) -> list[str]:
    if spec.host.channel == "vsock":
        return ["-device", _virtio(f"vhost-vsock-pci,guest-cid={spec.cid}", snp)]
    wd = spec.workdir
    argv = ["-device", _virtio("virtio-serial-pci,id=vser0", snp)]
    for chardev, socket, port in (
        ("agentch", AGENT_SOCKET, AGENT_PORT_NAME),
        ("hostch", HOST_API_SOCKET, HOST_API_PORT_NAME),
    ):
        argv += [
            "-chardev", f"socket,id={chardev},path={_opt(wd / socket)},server=on,wait=off",
            "-device", f"virtserialport,bus=vser0.0,chardev={chardev},name={port}",
        ]  # fmt: skip
    return argv


def _host_share(spec: LaunchSpec, cvm: CvmConfig, snp: bool) -> list[str]:
    wd = spec.workdir
    if cvm.host_share_mode == "9p":
        readonly = "on" if spec.image.shared_ro else "off"
        return [
            "-virtfs",
            f"local,path={_opt(wd / 'shared')},mount_tag=host-shared,readonly={readonly},"
            "security_model=mapped,id=virtfs0",
        ]
    if cvm.host_share_mode == "vvfat":
        return [
            "-blockdev",
            f"driver=vvfat,node-name=vvfat0,read-only=on,dir={_opt(wd / 'shared')},label=DSTACKSHR",
            "-device", _virtio("virtio-blk-pci,drive=vvfat0", snp),
        ]  # fmt: skip
    return [
        "-drive", f"file={_opt(wd / 'shared.img')},if=none,id=hd2,format=raw,readonly=on",
        "-device", _virtio("virtio-blk-pci,drive=hd2", snp),
    ]  # fmt: skip


def _numa(sizing: Sizing) -> list[str]:
    argv: list[str] = []
    n = len(sizing.nodes)
    if not n:
        return argv
    cpus = sizing.vcpus // n
    mem_gib = sizing.memory_mb // 1024 // n
    bus_nr = 5
    for k, (host_node, gpu_count) in enumerate(sizing.nodes):
        argv += [
            "-numa", f"node,nodeid={k},cpus={k * cpus}-{(k + 1) * cpus - 1},memdev=mem{k}",
            "-object",
            f"memory-backend-file,id=mem{k},size={mem_gib}G,mem-path=/dev/hugepages,share=on,"
            f"prealloc=yes,host-nodes={host_node},policy=bind",
            "-device",
            f"pxb-pcie,id=pcie.node{host_node},bus=pcie.0,addr=0x{0xA + k:x},numa_node={k},"
            f"bus_nr={bus_nr}",
        ]  # fmt: skip
        # Each expander bridge needs a bus number per root port behind it, plus its own.
        bus_nr += gpu_count + 1
    return argv


def _machine(spec: LaunchSpec, cvm: CvmConfig, tee: Tee, sizing: Sizing) -> list[str]:
    if tee == "none":
        return ["-machine", "q35,kernel-irqchip=split,hpet=off"]
    if tee == "tdx":
        tdx: dict[str, object] = {"qom-type": "tdx-guest", "id": "tdx"}
        if cvm.use_mrconfigid and spec.image.version_tuple >= _MRCONFIGID_MIN_VERSION:
            tdx["mrconfigid"] = mrconfigid_v1(spec.compose_hash)
        if cvm.qgs_port:
            qgs = {"type": "vsock", "cid": "2", "port": str(cvm.qgs_port)}
            tdx["quote-generation-socket"] = qgs
        return [
            "-machine", "q35,kernel-irqchip=split,confidential-guest-support=tdx,hpet=off",
            "-object", json.dumps(tdx, separators=(",", ":")),
        ]  # fmt: skip
    return [
        "-object",
        f"memory-backend-memfd,id=ram1,size={sizing.memory_mb}M,share=true,prealloc=false",
        "-object",
        "sev-snp-guest,id=sev0,policy=0x30000,sev-device=/dev/sev,kernel-hashes=on,"
        f"host-data={snp_host_data(spec.compose_hash)},cbitpos={spec.sev_cbitpos},"
        f"reduced-phys-bits={spec.sev_reduced_phys_bits}",
        "-machine",
        "q35,kernel-irqchip=split,confidential-guest-support=sev0,memory-backend=ram1,hpet=off",
    ]


def _gpus(
    gpus: tuple[str, ...],
    bridges: tuple[str, ...],
    numa_node_of: Callable[[str], int],
    *,
    hugepages: bool,
) -> list[str]:
    if not gpus and not bridges:
        return []
    argv = ["-object", "iommufd,id=iommufd0"]
    buses = [f"pcie.node{numa_node_of(s)}" if hugepages else "pcie.0" for s in gpus]
    buses += ["pcie.0"] * len(bridges)
    for d, (slot, bus) in enumerate(zip((*gpus, *bridges), buses, strict=True), start=1):
        argv += [
            "-device", f"pcie-root-port,id=pci.{d},bus={bus},chassis={d}",
            "-device", f"vfio-pci,host={slot},bus=pci.{d},iommufd=iommufd0",
        ]  # fmt: skip
    return argv
