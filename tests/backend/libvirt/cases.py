"""Launch facts for the domain XML tests: the same VM descriptions the QEMU argv tests use."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path
from typing import Any

from vmm.backend.base import LaunchSpec
from vmm.core.config import Config, GpuConfig, NetworkingConfig, PortMappingConfig, ProductConfig
from vmm.host.capabilities import HostCapabilities
from vmm.model.images import Image
from vmm.model.manifest import Manifest, Network, PortMap

WD = Path("/var/lib/vmm/run/0b6e-vm")
IMG = Path("/var/lib/vmm/images/dstack-0.5.4")
COMPOSE_HASH = hashlib.sha256(b'{"manifest_version":2,"name":"demo"}').hexdigest()
QEMU = "/usr/bin/qemu-system-x86_64"
NUMA = {"18:00.0": 0, "2a:00.0": 0, "9b:00.0": 1, "05:00.0": 0}
CPULIST = {0: "0-47,96-143", 1: "48-95,144-191"}


def make_image(path: Path = IMG, **changes: Any) -> Image:
    image = Image(
        name=path.name, path=path, metadata={}, version="0.5.4", is_dev=True, shared_ro=False,
        kernel=path / "bzImage", initrd=path / "initramfs.cpio.gz",
        cmdline="console=ttyS0 panic=1", rootfs=path / "rootfs.img.verity", hda=None, bios=None,
        bios_sev=None,
    )  # fmt: skip
    return replace(image, **changes)


def make_manifest(**changes: Any) -> Manifest:
    manifest = Manifest(
        id="0b6e5a3c-vm", name="demo", app_id="ab" * 20, image=IMG.name, vcpu=2, memory=2048,
        disk_size=20, created_at_ms=1_700_000_000_000,
    )  # fmt: skip
    return replace(manifest, **changes)


def tcg_host(**changes: Any) -> HostCapabilities:
    host = HostCapabilities(
        accel="tcg", tee="none", channel="serial", cpu_model="max", qemu_path=QEMU,
        qemu_version="7.2.22", bridges=False,
    )  # fmt: skip
    return replace(host, **changes)


def kvm_host(**changes: Any) -> HostCapabilities:
    return tcg_host(**({"accel": "kvm", "channel": "vsock", "cpu_model": "host"} | changes))


def with_cvm(config: Config | None = None, **changes: Any) -> Config:
    config = config or Config()
    return replace(config, cvm=replace(config.cvm, **changes))


def spec_of(manifest: Manifest, host: HostCapabilities, **changes: Any) -> LaunchSpec:
    spec = LaunchSpec(manifest=manifest, image=make_image(), workdir=WD, cid=1000, host=host,
                      compose_hash=COMPOSE_HASH)  # fmt: skip
    return replace(spec, **changes)


def dev_case() -> tuple[LaunchSpec, Config]:
    """No TEE, TCG, virtio-serial channel, one user NIC without mappings, 9p share."""
    return spec_of(make_manifest(), tcg_host()), Config()


def ports_case() -> tuple[LaunchSpec, Config]:
    """The dev VM with two mappings, one on the configured default address, restrict on."""
    manifest = make_manifest(port_map=(
        PortMap(protocol="tcp", host_port=18080, vm_port=8000, address="127.0.0.1"),
        PortMap(protocol="udp", host_port=18080, vm_port=53, address=""),
    ))  # fmt: skip
    config = with_cvm(
        port_mapping=PortMappingConfig(enabled=True, address="10.9.8.7"),
        networking=NetworkingConfig(restrict=True),
    )
    return spec_of(manifest, tcg_host()), config


def gpus_case() -> tuple[LaunchSpec, Config]:
    """KVM, vsock, three GPUs on two NUMA nodes + an NVSwitch, hugepages, pin_numa, vhd share."""
    manifest = make_manifest(vcpu=5, memory=9000, hugepages=True, pin_numa=True)
    config = with_cvm(host_share_mode="vhd", gpu=GpuConfig(enabled=True))
    spec = spec_of(
        manifest, kvm_host(), cid=1007, image=make_image(bios=IMG / "ovmf.fd"),
        numa_node_of=NUMA.__getitem__, node_cpulist=CPULIST.__getitem__,
        gpu_slots=("9b:00.0", "18:00.0", "2a:00.0"), bridge_slots=("05:00.0",),
    )  # fmt: skip
    return spec, config


def extras_case() -> tuple[LaunchSpec, Config]:
    """KVM with a named CPU, user + bridge NICs, swtpm, a volume, vvfat, SMBIOS, PCI options."""
    manifest = make_manifest(
        vcpu=4, memory=8192, swtpm=True,
        networks=(Network(mode="user"), Network(mode="bridge", bridge="br-cvm")),
        port_map=(PortMap(protocol="tcp", host_port=8443, vm_port=443, address="0.0.0.0"),),
        volumes=("/srv/volumes/models.img",),
    )  # fmt: skip
    product = ProductConfig(
        bios_vendor="Acme & Sons <lab>", bios_version="1.2", bios_date="01/02/2024",
        bios_release="1.2", product_serial="SN-42", board_name="B-1",
        chassis_asset_tag="rack 4, u2",
    )  # fmt: skip
    config = with_cvm(
        product=product, host_share_mode="vvfat", qemu_hotplug_off=True,
        qemu_pci_hole64_size=1 << 40, networking=NetworkingConfig(mac_prefix="52:54:00"),
    )  # fmt: skip
    spec = spec_of(manifest, kvm_host(cpu_model="EPYC-v4", channel="serial"), cid=1003,
                   image=make_image(shared_ro=True, hda=IMG / "hda.qcow2"))  # fmt: skip
    return spec, config


CASES = {
    "dev-tcg-serial": dev_case,
    "dev-tcg-ports": ports_case,
    "kvm-gpus-hugepages": gpus_case,
    "kvm-extras": extras_case,
}


def real_spec(workdir: Path, image: Image, vm_id: str, qemu: str, **manifest: Any) -> LaunchSpec:
    """A spec that really runs here: TCG, serial channel, the given image, a work dir with shared/."""
    (workdir / "shared").mkdir(parents=True, exist_ok=True)
    fields: dict[str, Any] = {"id": vm_id, "image": image.name, "vcpu": 1, "memory": 256,
                              "disk_size": 2} | manifest  # fmt: skip
    return LaunchSpec(manifest=make_manifest(**fields), image=image, workdir=workdir, cid=1000,
                      host=tcg_host(qemu_path=qemu), compose_hash=COMPOSE_HASH)  # fmt: skip
