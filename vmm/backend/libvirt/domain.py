"""The libvirt domain XML of one VM, as a pure function of the same launch facts as the QEMU argv.

``build_domain_xml`` mirrors ``vmm.backend.qemu.argv.build_qemu_argv`` group by group and reads no files.
Every value goes through ElementTree, so a path or SMBIOS string cannot break out of its
attribute. What libvirt cannot express is either injected as QEMU arguments
(``<qemu:commandline>``, each with the exact option text the QEMU backend uses) or refused by
``support.unsupported_features`` before a domain is defined. The differences are deliberate:

- User-mode NICs are injected (``-netdev user`` + ``-device virtio-net-pci``): libvirt's
  ``<interface type='user'>`` has no ``hostfwd``, ``dhcpstart`` or ``restrict``. Injected PCI
  devices sit on ``pcie.0`` from slot 0x18 up, clear of the root ports libvirt packs into the
  low slots (an unaddressed injected device collided with libvirt's root port at slot 1). Custom
  netdevs, swtpm, vvfat and ``qemu_hotplug_off`` are injected the same way.
- The serial console is ``<serial type='pty'>`` with ``<log file='serial.log' append='on'/>``;
  libvirt creates no ``serial.pty`` link. libvirt owns the QMP monitor, so there is no
  ``qmp.sock`` either: power-off and kill go through libvirt.
- GPUs are ``<hostdev managed='no'>`` behind one root port each (``chassis`` as in the argv),
  over legacy VFIO: libvirt 9.0 has no iommufd. As under the QEMU backend the operator binds
  them to vfio-pci. With hugepages the root ports sit on the ``pxb-pcie`` of their guest NUMA
  node; libvirt numbers the expander buses itself.
- The domain UUID is derived from the VM id (uuid5), so it is stable across redefinitions;
  ``cvm.product.product_uuid`` cannot be honoured (libvirt makes the SMBIOS system UUID the
  domain UUID, unique per domain) and is reported as unsupported.
- TEE domains are not built: libvirt 9.0 has no ``<launchSecurity>`` for TDX or SEV-SNP.
"""

from __future__ import annotations

import re
import uuid
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from vmm.backend.base import LaunchSpec
from vmm.backend.qemu.argv import (
    AGENT_PORT_NAME,
    HOST_API_PORT_NAME,
    Sizing,
    effective_tee,
    netdev_option,
    size_guest,
    verity_rootfs,
)
from vmm.core.config import Config, CvmConfig, ProductConfig
from vmm.host.capabilities import Tee
from vmm.model.workdir import AGENT_SOCKET, DISK, HOST_API_SOCKET

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
VMM_NS = "urn:x-vmm:libvirt:vm:1"
DOMAIN_PREFIX = "vmm-"
# uuid5 namespace for domain UUIDs: fixed forever, or adopted domains would change identity.
_UUID_NAMESPACE = uuid.UUID("5b0a3c1e-7d4f-4e62-9a51-0c8d2f6b13a7")
_FIRST_INJECTED_SLOT = 0x18
_LAST_PCIE0_SLOT = 0x1E  # 0x1f is the ICH9 LPC/SATA/SMBus function block
_FIRST_EXPANDER_SLOT = 0xA
_PCI_ADDRESS = re.compile(
    r"^(?:(?P<domain>[0-9A-Fa-f]{4}):)?(?P<bus>[0-9A-Fa-f]{2}):(?P<slot>[0-9A-Fa-f]{2})"
    r"\.(?P<function>[0-7])$"
)

ET.register_namespace("qemu", QEMU_NS)
ET.register_namespace("vmm", VMM_NS)


@dataclass(frozen=True)
class DomainMeta:
    """What the daemon keeps in the domain's ``<metadata>``: enough to adopt it after a restart."""

    vm_id: str
    cid: int
    workdir: str




def domain_name(vm_id: str, prefix: str = DOMAIN_PREFIX) -> str:
    return prefix + vm_id


def domain_uuid(vm_id: str) -> str:
    return str(uuid.uuid5(_UUID_NAMESPACE, vm_id))


def parse_meta(xml: str) -> DomainMeta | None:
    """The ``<vm>`` metadata element as ``virDomainGetMetadata`` returns it, else None.

    libvirt selects the element by our namespace URI and hands it back without the namespace,
    so tags are compared by local name.
    """
    try:
        # libvirt hands back the element this daemon wrote; expat resolves no external entities.
        element = ET.fromstring(xml)  # noqa: S314
    except ET.ParseError:
        return None
    fields = {_local(child.tag): (child.text or "") for child in element}
    vm_id, cid = fields.get("id", ""), fields.get("cid", "")
    if _local(element.tag) != "vm" or not vm_id or not cid.isdigit():
        return None
    return DomainMeta(vm_id=vm_id, cid=int(cid), workdir=fields.get("workdir", ""))


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def build_domain_xml(spec: LaunchSpec, config: Config, prefix: str = DOMAIN_PREFIX) -> str:
    """The full domain XML; check ``support.unsupported_features`` first: this only refuses TEEs."""
    if not spec.workdir.is_absolute():
        raise ValueError(f"the VM work directory must be absolute: {spec.workdir}")
    if not spec.host.qemu_path:
        raise ValueError("no QEMU binary: set cvm.qemu_path or install qemu-system-x86_64")
    tee: Tee = effective_tee(spec)
    if tee != "none":
        raise ValueError(f"the libvirt backend does not build {tee} domains")
    cvm = config.cvm
    gpus = spec.gpu_slots if cvm.gpu.enabled else ()
    bridges = spec.bridge_slots if cvm.gpu.enabled else ()
    addresses = [_pci_address(slot) for slot in (*gpus, *bridges)]
    sizing = size_guest(spec, gpus)

    domain = ET.Element("domain", type="kvm" if spec.host.accel == "kvm" else "qemu")
    _text(domain, "name", domain_name(spec.manifest.id, prefix))
    _text(domain, "uuid", domain_uuid(spec.manifest.id))
    _metadata(domain, spec)
    _text(domain, "memory", str(sizing.memory_mb), unit="MiB")
    _text(domain, "currentMemory", str(sizing.memory_mb), unit="MiB")
    if sizing.nodes:
        backing = ET.SubElement(domain, "memoryBacking")
        ET.SubElement(backing, "hugepages")
        ET.SubElement(backing, "access", mode="shared")
        ET.SubElement(backing, "allocation", mode="immediate")
    vcpu = _text(domain, "vcpu", str(sizing.vcpus), placement="static")
    if spec.manifest.pin_numa:
        vcpu.set("cpuset", spec.node_cpulist(spec.numa_node_of(gpus[0]) if gpus else 0))
    if sizing.nodes:
        numatune = ET.SubElement(domain, "numatune")
        for k, (host_node, _) in enumerate(sizing.nodes):
            ET.SubElement(numatune, "memnode", cellid=str(k), mode="strict", nodeset=str(host_node))
    has_sysinfo = _sysinfo(domain, cvm.product)
    _os(domain, spec, has_sysinfo)
    features = ET.SubElement(domain, "features")
    ET.SubElement(features, "acpi")
    ET.SubElement(features, "apic")
    if spec.host.accel == "kvm":
        ET.SubElement(features, "ioapic", driver="qemu")  # kernel-irqchip=split
    _cpu(domain, spec, sizing)
    clock = ET.SubElement(domain, "clock", offset="utc")
    ET.SubElement(clock, "timer", name="hpet", present="no")
    _text(domain, "on_poweroff", "destroy")
    _text(domain, "on_reboot", "restart")
    _text(domain, "on_crash", "destroy")

    devices = ET.SubElement(domain, "devices")
    injected = _Injected()
    _text(devices, "emulator", spec.host.qemu_path)
    _disks(devices, spec, cvm)
    _pci_root(devices, cvm)
    _gpus(devices, spec, gpus, addresses, sizing)
    _nics(devices, injected, spec, config)
    serial = ET.SubElement(devices, "serial", type="pty")
    ET.SubElement(serial, "log", file=str(spec.workdir / "serial.log"), append="on")
    ET.SubElement(serial, "target", type="isa-serial", port="0")
    if spec.manifest.swtpm:
        injected.swtpm(spec.workdir)
    _guest_channel(devices, spec)
    _host_share(devices, injected, spec, cvm)
    ET.SubElement(devices, "controller", type="usb", model="none")
    ET.SubElement(devices, "memballoon", model="none")
    if cvm.qemu_hotplug_off:
        injected.args += ["-global", "ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off"]
    if injected.args:
        commandline = ET.SubElement(domain, f"{{{QEMU_NS}}}commandline")
        for arg in injected.args:
            ET.SubElement(commandline, f"{{{QEMU_NS}}}arg", value=arg)
    ET.indent(domain)
    return ET.tostring(domain, encoding="unicode") + "\n"


class _Injected:
    """QEMU arguments libvirt cannot express, and the pcie.0 slots their devices take."""

    def __init__(self) -> None:
        self.args: list[str] = []
        self._next_slot = _FIRST_INJECTED_SLOT

    def pci_device(self, device: str) -> None:
        if self._next_slot > _LAST_PCIE0_SLOT:
            raise ValueError("too many injected PCI devices (user NICs, custom NICs, vvfat share)")
        self.args += ["-device", f"{device},bus=pcie.0,addr=0x{self._next_slot:x}"]
        self._next_slot += 1

    def swtpm(self, wd: Path) -> None:
        self.args += [
            "-chardev", f"socket,id=chrtpm,path={_opt(wd / 'swtpm' / 'swtpm.sock')}",
            "-tpmdev", "emulator,id=tpm0,chardev=chrtpm",
            "-device", "tpm-tis,tpmdev=tpm0",
        ]  # fmt: skip


def _text(parent: ET.Element, tag: str, text: str, **attrs: str) -> ET.Element:
    element = ET.SubElement(parent, tag, attrs)
    element.text = text
    return element


def _opt(value: object) -> str:
    # Injected QEMU option lists split on ","; a literal comma is written ",,".
    return str(value).replace(",", ",,")






def _pci_address(slot: str) -> dict[str, str]:
    match = _PCI_ADDRESS.match(slot)
    if match is None:
        raise ValueError(f"bad PCI slot {slot!r}: expected [DDDD:]BB:SS.F in hex")
    return {
        "domain": f"0x{match['domain'] or '0000'}", "bus": f"0x{match['bus']}",
        "slot": f"0x{match['slot']}", "function": f"0x{match['function']}",
    }  # fmt: skip


def _metadata(domain: ET.Element, spec: LaunchSpec) -> None:
    vm = ET.SubElement(ET.SubElement(domain, "metadata"), f"{{{VMM_NS}}}vm")
    _text(vm, f"{{{VMM_NS}}}id", spec.manifest.id)
    _text(vm, f"{{{VMM_NS}}}cid", str(spec.cid))
    _text(vm, f"{{{VMM_NS}}}workdir", str(spec.workdir))


_SYSINFO_FIELDS: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = (
    ("bios", (("vendor", "bios_vendor"), ("version", "bios_version"), ("date", "bios_date"),
              ("release", "bios_release"))),
    ("system", (("manufacturer", "sys_vendor"), ("product", "product_name"),
                ("version", "product_version"), ("serial", "product_serial"),
                ("sku", "product_sku"), ("family", "product_family"))),
    ("baseBoard", (("manufacturer", "board_vendor"), ("product", "board_name"),
                   ("version", "board_version"), ("serial", "board_serial"),
                   ("asset", "board_asset_tag"))),
    ("chassis", (("manufacturer", "chassis_vendor"), ("version", "chassis_version"),
                 ("serial", "chassis_serial"), ("asset", "chassis_asset_tag"))),
)  # fmt: skip


def _sysinfo(domain: ET.Element, product: ProductConfig) -> bool:
    """SMBIOS types 0-3 as ``<sysinfo>``; product_uuid is left out (reported as unsupported)."""
    sysinfo = ET.Element("sysinfo", type="smbios")
    for group, fields in _SYSINFO_FIELDS:
        pairs = [(key, getattr(product, attr)) for key, attr in fields]
        if any(value for _, value in pairs):
            element = ET.SubElement(sysinfo, group)
            for key, value in pairs:
                if value:
                    _text(element, "entry", value, name=key)
    if len(sysinfo):
        domain.append(sysinfo)
    return bool(len(sysinfo))


def _os(domain: ET.Element, spec: LaunchSpec, has_sysinfo: bool) -> None:
    os_element = ET.SubElement(domain, "os")
    _text(os_element, "type", "hvm", arch="x86_64", machine="q35")
    if spec.image.bios is not None:
        _text(os_element, "loader", str(spec.image.bios), readonly="yes", type="rom")
    _text(os_element, "kernel", str(spec.image.kernel))
    _text(os_element, "initrd", str(spec.image.initrd))
    if spec.image.cmdline:
        _text(os_element, "cmdline", spec.image.cmdline)
    if has_sysinfo:
        ET.SubElement(os_element, "smbios", mode="sysinfo")


def _cpu(domain: ET.Element, spec: LaunchSpec, sizing: Sizing) -> None:
    model = spec.host.cpu_model
    if model == "host":
        cpu = ET.SubElement(domain, "cpu", mode="host-passthrough", check="none")
    elif model == "max":
        cpu = ET.SubElement(domain, "cpu", mode="maximum", check="none")
    else:
        cpu = ET.SubElement(domain, "cpu", mode="custom", match="exact", check="none")
        _text(cpu, "model", model, fallback="forbid")
    if not sizing.nodes:
        return
    numa = ET.SubElement(cpu, "numa")
    n = len(sizing.nodes)
    cpus = sizing.vcpus // n
    mem_gib = sizing.memory_mb // 1024 // n
    for k in range(n):
        ET.SubElement(numa, "cell", id=str(k), cpus=f"{k * cpus}-{(k + 1) * cpus - 1}",
                      memory=str(mem_gib), unit="GiB", memAccess="shared")  # fmt: skip


def _disk(devices: ET.Element, index: int, source: Path, fmt: str, *, readonly: bool) -> None:
    disk = ET.SubElement(devices, "disk", type="file", device="disk")
    ET.SubElement(disk, "driver", name="qemu", type=fmt)
    ET.SubElement(disk, "source", file=str(source))
    ET.SubElement(disk, "target", dev=_disk_name(index), bus="virtio")
    if readonly:
        ET.SubElement(disk, "readonly")


def _disk_name(index: int) -> str:
    # vda .. vdz, vdaa .. as the Linux virtio-blk driver names them.
    letters = ""
    index += 1
    while index:
        index, rest = divmod(index - 1, 26)
        letters = chr(ord("a") + rest) + letters
    return "vd" + letters


def _disks(devices: ET.Element, spec: LaunchSpec, cvm: CvmConfig) -> None:
    sources: list[tuple[Path, str, bool]] = []
    rootfs = verity_rootfs(spec)
    if rootfs is not None:
        sources.append((rootfs, "raw", True))
    sources.append((spec.workdir / DISK, "qcow2", False))
    sources += [(Path(volume), "raw", True) for volume in spec.manifest.volumes]
    if cvm.host_share_mode == "vhd":
        sources.append((spec.workdir / "shared.img", "raw", True))
    for index, (source, fmt, readonly) in enumerate(sources):
        _disk(devices, index, source, fmt, readonly=readonly)


def _pci_root(devices: ET.Element, cvm: CvmConfig) -> None:
    root = ET.SubElement(devices, "controller", type="pci", index="0", model="pcie-root")
    if cvm.qemu_pci_hole64_size > 0:
        _text(root, "pcihole64", str(-(-cvm.qemu_pci_hole64_size // 1024)), unit="KiB")


def _gpus(
    devices: ET.Element, spec: LaunchSpec, gpus: tuple[str, ...],
    addresses: list[dict[str, str]], sizing: Sizing,
) -> None:  # fmt: skip
    expander_index = {}
    for k, (host_node, _) in enumerate(sizing.nodes):
        index = k + 1
        expander_index[host_node] = index
        pxb = ET.SubElement(devices, "controller", type="pci", index=str(index),
                            model="pcie-expander-bus")  # fmt: skip
        ET.SubElement(pxb, "model", name="pxb-pcie")
        _text(ET.SubElement(pxb, "target"), "node", str(k))
        ET.SubElement(pxb, "address", type="pci", domain="0x0000", bus="0x00",
                      slot=f"0x{_FIRST_EXPANDER_SLOT + k:02x}", function="0x0")  # fmt: skip
    next_index = len(sizing.nodes) + 1
    ports_on: Counter[int] = Counter()
    for d, address in enumerate(addresses, start=1):
        port_index = next_index
        next_index += 1
        port = ET.SubElement(devices, "controller", type="pci", index=str(port_index),
                             model="pcie-root-port")  # fmt: skip
        ET.SubElement(port, "model", name="pcie-root-port")
        ET.SubElement(port, "target", chassis=str(d))
        is_gpu = d <= len(gpus)
        if sizing.nodes and is_gpu:
            bus = expander_index[spec.numa_node_of(gpus[d - 1])]
            ET.SubElement(port, "address", type="pci", domain="0x0000", bus=f"0x{bus:02x}",
                          slot=f"0x{ports_on[bus]:02x}", function="0x0")  # fmt: skip
            ports_on[bus] += 1
        hostdev = ET.SubElement(devices, "hostdev", mode="subsystem", type="pci", managed="no")
        ET.SubElement(ET.SubElement(hostdev, "source"), "address", address)
        ET.SubElement(hostdev, "address", type="pci", domain="0x0000", bus=f"0x{port_index:02x}",
                      slot="0x00", function="0x0")  # fmt: skip




def _nics(devices: ET.Element, injected: _Injected, spec: LaunchSpec, config: Config) -> None:
    for nic in spec.resolved_nics(config.cvm.networking):
        if nic.mode == "bridge":
            interface = ET.SubElement(devices, "interface", type="bridge")
            ET.SubElement(interface, "mac", address=nic.mac)
            ET.SubElement(interface, "source", bridge=nic.bridge)
            ET.SubElement(interface, "model", type="virtio")
            continue
        injected.args += ["-netdev", netdev_option(nic, config.cvm.port_mapping.address,
                                                   spec.workdir)]
        injected.pci_device(f"virtio-net-pci,netdev={nic.netdev_id},mac={nic.mac}")


def _guest_channel(devices: ET.Element, spec: LaunchSpec) -> None:
    if spec.host.channel == "vsock":
        vsock = ET.SubElement(devices, "vsock", model="virtio")
        ET.SubElement(vsock, "cid", auto="no", address=str(spec.cid))
        return
    ET.SubElement(devices, "controller", type="virtio-serial", index="0")
    for socket, port in ((AGENT_SOCKET, AGENT_PORT_NAME), (HOST_API_SOCKET, HOST_API_PORT_NAME)):
        channel = ET.SubElement(devices, "channel", type="unix")
        ET.SubElement(channel, "source", mode="bind", path=str(spec.workdir / socket))
        ET.SubElement(channel, "target", type="virtio", name=port)


def _host_share(devices: ET.Element, injected: _Injected, spec: LaunchSpec, cvm: CvmConfig) -> None:
    shared = spec.workdir / "shared"
    if cvm.host_share_mode == "9p":
        share = ET.SubElement(devices, "filesystem", type="mount", accessmode="mapped")
        ET.SubElement(share, "source", dir=str(shared))
        ET.SubElement(share, "target", dir="host-shared")
        if spec.image.shared_ro:
            ET.SubElement(share, "readonly")
    elif cvm.host_share_mode == "vvfat":
        # libvirt's <disk type='dir'> cannot set the FAT label the guest looks for.
        injected.args += [
            "-blockdev",
            f"driver=vvfat,node-name=vvfat0,read-only=on,dir={_opt(shared)},label=DSTACKSHR",
        ]
        injected.pci_device("virtio-blk-pci,drive=vvfat0")
    # "vhd" is a plain read-only disk, added with the others.
