"""The QEMU command line: golden argv per platform, targeted rules, and one real QEMU start.

Regenerate the golden files after an intended change with
``VMM_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/backend/qemu/test_argv.py`` and review the diff;
a normal run only compares.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import os
import shutil
import socket
import subprocess
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from tests.support.short_dirs import short_dir
from vmm.backend.base import LaunchSpec
from vmm.backend.disk import qemu_img_create_argv
from vmm.backend.qemu.argv import build_qemu_argv, effective_tee
from vmm.core.config import (
    Config,
    GpuConfig,
    NetworkingConfig,
    PortMappingConfig,
    ProductConfig,
)
from vmm.host.capabilities import HostCapabilities
from vmm.model.images import Image
from vmm.model.manifest import Manifest, Network, PortMap
from vmm.model.workdir import AGENT_SOCKET, HOST_API_SOCKET, QMP_SOCKET
from vmm.net.macs import derive_mac
from vmm.net.nics import resolve_networks
from vmm.net.tap import tap_name

GOLDEN = Path(__file__).parent / "golden"
UPDATE_GOLDEN = os.environ.get("VMM_UPDATE_GOLDEN") == "1"
WD = Path("/var/lib/vmm/run/0b6e-vm")
IMG = Path("/var/lib/vmm/images/dstack-0.5.4")
COMPOSE_HASH = hashlib.sha256(b'{"manifest_version":2,"name":"demo"}').hexdigest()
QEMU = "/usr/bin/qemu-system-x86_64"


def make_image(path: Path = IMG, **changes: Any) -> Image:
    image = Image(
        name=path.name,
        path=path,
        metadata={},
        version="0.5.4",
        is_dev=True,
        shared_ro=False,
        kernel=path / "bzImage",
        initrd=path / "initramfs.cpio.gz",
        cmdline="console=ttyS0 panic=1",
        rootfs=path / "rootfs.img.verity",
        hda=None,
        bios=None,
        bios_sev=None,
    )
    return replace(image, **changes)


def make_manifest(**changes: Any) -> Manifest:
    manifest = Manifest(
        id="0b6e5a3c-vm",
        name="demo",
        app_id="ab" * 20,
        image=IMG.name,
        vcpu=2,
        memory=2048,
        disk_size=20,
        created_at_ms=1_700_000_000_000,
    )
    return replace(manifest, **changes)


def tcg_host(**changes: Any) -> HostCapabilities:
    host = HostCapabilities(
        accel="tcg", tee="none", channel="serial", cpu_model="max", qemu_path=QEMU,
        qemu_version="7.2.22", bridges=False,
    )  # fmt: skip
    return replace(host, **changes)


def kvm_host(tee: str, **changes: Any) -> HostCapabilities:
    cpu = "EPYC-v4" if tee == "sev-snp" else "host"
    return tcg_host(accel="kvm", tee=tee, channel="vsock", cpu_model=cpu, **changes)


def with_cvm(config: Config | None = None, **changes: Any) -> Config:
    config = config or Config()
    return replace(config, cvm=replace(config.cvm, **changes))


def dev_case(wd: Path = WD, img: Path = IMG, host_port: int = 18080) -> tuple[LaunchSpec, Config]:
    """No TEE, TCG, virtio-serial channel, one user NIC with two mappings, 9p share."""
    manifest = make_manifest(
        port_map=(
            PortMap(protocol="tcp", host_port=host_port, vm_port=8000, address="127.0.0.1"),
            PortMap(protocol="udp", host_port=host_port, vm_port=53, address=""),
        ),
    )
    spec = LaunchSpec(
        manifest=manifest, image=make_image(img), workdir=wd, cid=1000, host=tcg_host(),
        compose_hash=COMPOSE_HASH,
    )  # fmt: skip
    return spec, Config()


def tdx_case() -> tuple[LaunchSpec, Config]:
    """TDX, vsock, user + bridge NICs, SMBIOS extras, swtpm, a volume, qmp off."""
    manifest = make_manifest(
        vcpu=4,
        memory=8192,
        swtpm=True,
        networks=(Network(mode="user"), Network(mode="bridge", bridge="br-cvm")),
        port_map=(PortMap(protocol="tcp", host_port=8443, vm_port=443, address="0.0.0.0"),),
        volumes=("/srv/volumes/models.img",),
    )
    image = make_image(
        shared_ro=True, bios=IMG / "ovmf.fd", hda=IMG / "hda.qcow2",
        cmdline="console=ttyS0 dstack.fde=1",
    )  # fmt: skip
    product = ProductConfig(
        bios_vendor="Acme", bios_version="1.2", product_serial="SN-42", product_uuid=
        "8e6c0b8a-5c3e-4f5e-9a7b-0d1e2f3a4b5c", board_name="B-1", chassis_asset_tag="rack 4, u2",
    )  # fmt: skip
    config = with_cvm(
        qmp_socket=False, product=product, host_share_mode="vvfat", qemu_hotplug_off=True,
        qemu_pci_hole64_size=1 << 40, networking=NetworkingConfig(mac_prefix="52:54:00"),
    )  # fmt: skip
    spec = LaunchSpec(
        manifest=manifest, image=image, workdir=WD, cid=1003, host=kvm_host("tdx"),
        compose_hash=COMPOSE_HASH,
    )  # fmt: skip
    return spec, config


NUMA = {"18:00.0": 0, "2a:00.0": 0, "9b:00.0": 1, "05:00.0": 0}
CPULIST = {0: "0-47,96-143", 1: "48-95,144-191"}


def snp_case() -> tuple[LaunchSpec, Config]:
    """SEV-SNP, vsock, three GPUs on two NUMA nodes + an NVSwitch, hugepages, pin_numa, user."""
    manifest = make_manifest(vcpu=5, memory=9000, hugepages=True, pin_numa=True)
    image = make_image(bios=IMG / "ovmf.fd", bios_sev=IMG / "ovmf-sev.fd")
    config = with_cvm(user="cvm", host_share_mode="vhd", gpu=GpuConfig(enabled=True))
    spec = LaunchSpec(
        manifest=manifest, image=image, workdir=WD, cid=1007, host=kvm_host("sev-snp"),
        compose_hash=COMPOSE_HASH, numa_node_of=NUMA.__getitem__,
        node_cpulist=CPULIST.__getitem__, gpu_slots=("9b:00.0", "18:00.0", "2a:00.0"),
        bridge_slots=("05:00.0",), sev_cbitpos=47,
    )  # fmt: skip
    return spec, config


def check_golden(name: str, argv: list[str]) -> None:
    text = "\n".join(argv).replace(str(WD), "{wd}").replace(str(IMG), "{img}") + "\n"
    path = GOLDEN / f"{name}.txt"
    if UPDATE_GOLDEN:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert text == path.read_text(), f"argv differs from {path}; see the module docstring"


def values(argv: list[str], flag: str) -> list[str]:
    return [v for f, v in itertools.pairwise(argv) if f == flag]


def value_of(argv: list[str], flag: str, contains: str = "") -> str:
    return next(v for v in values(argv, flag) if contains in v)


def netdevs(argv: list[str]) -> list[str]:
    return values(argv, "-netdev")


@pytest.mark.parametrize(
    ("name", "case"),
    [("dev-tcg-serial", dev_case), ("tdx-vsock-two-nics", tdx_case),
     ("snp-gpus-hugepages", snp_case)],
)  # fmt: skip
def test_golden_argv(name: str, case: Any) -> None:
    """Each platform's full argv matches its golden file element for element."""
    spec, config = case()
    check_golden(name, build_qemu_argv(spec, config))


def first(argv: list[str], mark: str) -> int:
    return next(i for i, a in enumerate(argv) if a == mark or (mark[0] != "-" and mark in a))


def test_device_groups_follow_reference_order() -> None:
    """Console, firmware, disks, NICs, SMBIOS, channel, share, machine, size, cmdline in order."""
    argv = build_qemu_argv(*dev_case())
    marks = ["-accel", "pty,id=com0", "-qmp", "-kernel", "id=hd0", "id=hd1", "user,id=net0",
             "-smbios", "virtio-serial-pci", "chardev=agentch", "chardev=hostch", "-virtfs",
             "-machine", "-smp", "-append"]  # fmt: skip
    positions = [first(argv, m) for m in marks]
    assert positions == sorted(positions)
    snp = build_qemu_argv(*snp_case())
    marks = ["-accel", "-bios", "id=hd1", "-netdev", "-smbios", "vhost-vsock-pci", "id=hd2",
             "-numa", "memory-backend-memfd", "-machine", "iommufd,id=iommufd0", "vfio-pci",
             "-smp", "-append"]  # fmt: skip
    positions = [first(snp, m) for m in marks]
    assert positions == sorted(positions)


def test_hostfwd_on_the_nic_each_mapping_names() -> None:
    """With bridge, user, user NICs each mapping's hostfwd goes on the NIC it was placed on."""
    spec, config = dev_case()
    nets = (Network(mode="bridge", bridge="br0"), Network(mode="user"), Network(mode="user"))
    tcp, udp = spec.manifest.port_map
    ports = (replace(tcp, nic=1), replace(udp, nic=2))
    spec = replace(spec, manifest=spec.manifest.evolve(networks=nets, port_map=ports))
    devs = netdevs(build_qemu_argv(spec, config))
    assert devs[0] == f"tap,id=net0,ifname={tap_name(spec.manifest.id, 0)},script=no,downscript=no"
    assert devs[1].startswith("user,id=net1,") and devs[1].endswith(",hostfwd=tcp:127.0.0.1:18080-:8000")
    assert devs[2].startswith("user,id=net2,") and devs[2].endswith(",hostfwd=udp:127.0.0.1:18080-:53")


def test_empty_host_address_uses_config_address() -> None:
    """A mapping without an address binds cvm.port_mapping.address."""
    spec, config = dev_case()
    config = with_cvm(config, port_mapping=PortMappingConfig(address="10.9.8.7"))
    net0 = netdevs(build_qemu_argv(spec, config))[0]
    assert "hostfwd=tcp:127.0.0.1:18080-:8000" in net0
    assert net0.endswith(",hostfwd=udp:10.9.8.7:18080-:53")


def test_ipv6_host_address_is_bracketed() -> None:
    """An IPv6 host address, from the mapping or the config, is written in brackets."""
    spec, config = dev_case()
    mapping = PortMap(protocol="tcp", host_port=8080, vm_port=80, address="::1")
    spec = replace(spec, manifest=spec.manifest.evolve(port_map=(mapping,)))
    assert "hostfwd=tcp:[::1]:8080-:80" in netdevs(build_qemu_argv(spec, config))[0]
    spec = replace(spec, manifest=spec.manifest.evolve(port_map=(replace(mapping, address=""),)))
    config = with_cvm(config, port_mapping=PortMappingConfig(address="fd00::2"))
    assert "hostfwd=tcp:[fd00::2]:8080-:80" in netdevs(build_qemu_argv(spec, config))[0]


@pytest.mark.parametrize(("mapping", "fragment"), [
    (PortMap("tcp", 8080, 80, "::1%x,guestfwd=tcp:10.0.2.100:1234-cmd:touch X"), "address"),
    (PortMap("tcp", 8080, 80, "127.0.0.1,guestfwd=tcp:10.0.2.100:1-cmd:id"), "address"),
    (PortMap("tcp", 8080, 80, "fe80::1%eth0"), "address"),
    (PortMap("tcp", 8080, 80, "127.0.0.1\n"), "address"),
    (PortMap("tcp", 8080, 80, "localhost"), "address"),
    (PortMap("tcp,guestfwd=tcp:10.0.2.100:1-cmd:id", 8080, 80, "127.0.0.1"), "protocol"),  # type: ignore[arg-type]
    (PortMap("tcp", -1, 80, "127.0.0.1"), "host port"),
    (PortMap("tcp", 8080, 0, "127.0.0.1"), "VM port"),
    (PortMap("tcp", 8080, 65536, "127.0.0.1"), "VM port"),
    (PortMap("tcp", "8080,guestfwd=x", 80, "127.0.0.1"), "host port"),  # type: ignore[arg-type]
    (PortMap("tcp", 8080, True, "127.0.0.1"), "VM port"),
])
def test_hostfwd_refuses_values_that_leave_their_option(mapping: PortMap, fragment: str) -> None:
    """A hostfwd piece that is not a plain IP literal, tcp|udp or a port number is a ValueError."""
    spec, config = dev_case()
    spec = replace(spec, manifest=spec.manifest.evolve(port_map=(mapping,)))
    with pytest.raises(ValueError, match=f"hostfwd {fragment}"):
        build_qemu_argv(spec, config)


def test_hostfwd_refuses_an_unsafe_configured_default_address() -> None:
    """The default address fills an empty mapping address and is held to the same rule."""
    spec, config = dev_case()
    config = with_cvm(config, port_mapping=PortMappingConfig(address="::1%a,guestfwd=x"))
    with pytest.raises(ValueError, match="hostfwd address"):
        build_qemu_argv(spec, config)


def test_non_verity_rootfs_is_refused() -> None:
    """An .iso (or any non-.verity) rootfs is a ValueError naming the image and file."""
    spec, config = dev_case()
    spec = replace(spec, image=make_image(rootfs=IMG / "rootfs.iso"))
    with pytest.raises(ValueError, match=r"'dstack-0\.5\.4'.*'rootfs\.iso'"):
        build_qemu_argv(spec, config)


def test_image_without_rootfs_skips_hd0() -> None:
    """No rootfs means no hd0 drive; hda.img stays hd1."""
    spec, config = dev_case()
    argv = build_qemu_argv(replace(spec, image=make_image(rootfs=None)), config)
    assert values(argv, "-drive") == [f"file={WD}/hda.img,if=none,id=hd1"]


def test_mrconfigid_decodes_to_v1_layout() -> None:
    """mrconfigid is 48 bytes: 0x01, the compose hash, then zeros."""
    spec, config = tdx_case()
    tdx = json.loads(value_of(build_qemu_argv(spec, config), "-object", "tdx-guest"))
    raw = base64.b64decode(tdx["mrconfigid"])
    assert len(raw) == 48
    assert raw[0] == 1 and raw[1:33] == bytes.fromhex(COMPOSE_HASH) and raw[33:] == bytes(15)
    assert tdx["quote-generation-socket"] == {"type": "vsock", "cid": "2", "port": "4050"}


def test_mrconfigid_needs_image_052_and_config() -> None:
    """Images before 0.5.2, or use_mrconfigid=false, get no mrconfigid."""
    spec, config = tdx_case()
    old = replace(spec, image=replace(spec.image, version="0.5.1"))
    assert "mrconfigid" not in value_of(build_qemu_argv(old, config), "-object", "tdx-guest")
    off = with_cvm(config, use_mrconfigid=False)
    assert "mrconfigid" not in value_of(build_qemu_argv(spec, off), "-object", "tdx-guest")


def test_no_tee_manifest_forces_plain_machine() -> None:
    """manifest.no_tee gives TEE none on a TDX or SNP host: plain q35, no TEE objects."""
    for case in (tdx_case, snp_case):
        spec, config = case()
        spec = replace(spec, manifest=spec.manifest.evolve(no_tee=True))
        argv = build_qemu_argv(spec, config)
        assert effective_tee(spec) == "none"
        assert value_of(argv, "-machine") == "q35,kernel-irqchip=split,hpet=off"
        assert not any("tdx-guest" in a or "sev-snp-guest" in a for a in argv)
        assert not any("iommu_platform" in a for a in argv)


def test_snp_suffix_on_every_virtio_device() -> None:
    """Under SEV-SNP each virtio PCI -device string ends with the SNP suffix."""
    argv = build_qemu_argv(*snp_case())
    virtio = [v for v in values(argv, "-device") if v.startswith(("virtio-", "vhost-"))]
    assert len(virtio) == 5  # hd0, hd1, net0, vsock, shared.img (hd2)
    assert all(v.endswith(",disable-legacy=on,iommu_platform=true") for v in virtio)


def test_snp_prefers_bios_sev_and_takes_host_data() -> None:
    """SNP boots bios-sev and binds the compose hash through host-data."""
    argv = build_qemu_argv(*snp_case())
    assert value_of(argv, "-bios") == f"{IMG}/ovmf-sev.fd"
    guest = value_of(argv, "-object", "sev-snp-guest")
    host_data = guest.split("host-data=")[1].split(",")[0]
    assert base64.b64decode(host_data) == hashlib.sha256(bytes.fromhex(COMPOSE_HASH)).digest()


def test_hugepages_round_vcpus_and_memory_to_nodes() -> None:
    """Two NUMA nodes: 5 vCPUs become 6, 9000 MB becomes 10 GiB split 5G per node."""
    argv = build_qemu_argv(*snp_case())
    assert argv[argv.index("-smp") + 1] == "6"
    assert argv[argv.index("-m") + 1] == "10240M"
    assert value_of(argv, "-numa", "nodeid=1") == "node,nodeid=1,cpus=3-5,memdev=mem1"
    assert "size=5G" in value_of(argv, "-object", "id=mem1")


def test_command_prefix_is_sudo_then_taskset() -> None:
    """cvm.user and pin_numa prefix sudo, then taskset on the first GPU's node CPUs."""
    argv = build_qemu_argv(*snp_case())
    assert argv[:7] == ["sudo", "-u", "cvm", "taskset", "-c", CPULIST[1], QEMU]


def test_gpus_ignored_when_gpu_disabled() -> None:
    """With cvm.gpu.enabled=false no GPU is passed through and no NUMA is pinned to GPUs."""
    spec, config = snp_case()
    argv = build_qemu_argv(spec, with_cvm(config, gpu=GpuConfig(enabled=False)))
    assert not any("vfio-pci" in a or "iommufd" in a for a in argv)
    assert argv[3:6] == ["taskset", "-c", CPULIST[0]]


def test_default_smbios_and_comma_escaping() -> None:
    """Default product gives exactly one type=1 entry; commas in values are doubled."""
    argv = build_qemu_argv(*dev_case())
    assert values(argv, "-smbios") == ["type=1,manufacturer=dstack,product=dstack"]
    tdx = build_qemu_argv(*tdx_case())
    assert value_of(tdx, "-smbios", "type=3") == "type=3,asset=rack 4,, u2"


def test_resolve_networks_defaults_and_macs() -> None:
    """No entries gives one NIC from [cvm.networking]; MACs use the VM id and prefix."""
    config = NetworkingConfig(mode="bridge", bridge="virbr0", mac_prefix="0e")
    nics = resolve_networks(make_manifest(), config)
    assert len(nics) == 1
    nic = nics[0]
    assert (nic.index, nic.mode, nic.bridge, nic.netdev_id) == (0, "bridge", "virbr0", "net0")
    assert nic.mac == derive_mac("0b6e5a3c-vm", 0, b"\x0e")
    two = resolve_networks(make_manifest(networks=(Network("user"), Network("user"))), config)
    assert [n.mac for n in two] == [derive_mac("0b6e5a3c-vm", i, b"\x0e") for i in (0, 1)]
    assert [n.bridge for n in two] == ["", ""]


def test_resolve_networks_rejects_incomplete_modes() -> None:
    """Bridge mode without a bridge, or custom without id=net<i>, is a ValueError."""
    with pytest.raises(ValueError, match="bridge"):
        resolve_networks(make_manifest(networks=(Network("bridge"),)), NetworkingConfig())
    custom = NetworkingConfig(netdev="tap,id=net10,ifname=t0")
    with pytest.raises(ValueError, match="id=net0"):
        resolve_networks(make_manifest(networks=(Network("custom"),)), custom)
    ok = NetworkingConfig(netdev="tap,id=net0,ifname=t0,script=no")
    assert resolve_networks(make_manifest(networks=(Network("custom"),)), ok)[0].netdev == (
        "tap,id=net0,ifname=t0,script=no"
    )


def test_qemu_img_create_with_and_without_backing() -> None:
    """hda.img is a plain qcow2, or one backed by the image's hda."""
    spec, _ = dev_case()
    assert qemu_img_create_argv(spec) == [
        "qemu-img", "create", "-f", "qcow2", f"{WD}/hda.img", "20G",
    ]  # fmt: skip
    spec = replace(spec, image=make_image(hda=IMG / "hda.qcow2"))
    assert qemu_img_create_argv(spec, "/usr/bin/qemu-img") == [
        "/usr/bin/qemu-img", "create", "-f", "qcow2", "-o", f"backing_file={IMG}/hda.qcow2",
        "-o", "backing_fmt=qcow2", f"{WD}/hda.img", "20G",
    ]  # fmt: skip


def test_relative_workdir_is_refused() -> None:
    """The work directory must be absolute: QEMU runs with the supervisor's cwd."""
    spec, config = dev_case(wd=Path("run/vm"))
    with pytest.raises(ValueError, match="absolute"):
        build_qemu_argv(spec, config)


# --- real QEMU -----------------------------------------------------------------------------


def _without_boot(argv: list[str]) -> list[str]:
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("-kernel", "-initrd", "-append"):
            skip = True
        else:
            out.append(arg)
    return out


class _Qmp:
    def __init__(self, path: Path, timeout: float) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.reader = self.sock.makefile("rb")
        assert "QMP" in json.loads(self.reader.readline())

    def call(self, command: str, **arguments: Any) -> Any:
        message: dict[str, Any] = {"execute": command}
        if arguments:
            message["arguments"] = arguments
        self.sock.sendall(json.dumps(message).encode() + b"\n")
        while True:  # events may arrive before the reply
            reply = json.loads(self.reader.readline())
            if "return" in reply:
                return reply["return"]
            assert "error" not in reply, reply

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


@pytest.mark.qemu
def test_development_argv_starts_real_qemu() -> None:
    """QEMU 7.2 under TCG accepts the development argv: QMP answers, serial sockets exist."""
    qemu = shutil.which("qemu-system-x86_64")
    qemu_img = shutil.which("qemu-img")
    if not qemu or not qemu_img:
        pytest.skip("qemu-system-x86_64 or qemu-img is not installed")
    with short_dir("qa") as wd:
        proc: subprocess.Popen[bytes] | None = None
        try:
            img = wd / "img"
            img.mkdir()
            (img / "rootfs.img.verity").write_bytes(bytes(1 << 20))
            (wd / "shared").mkdir()
            spec, config = dev_case(wd=wd, img=img, host_port=0)
            spec = replace(spec, host=replace(spec.host, qemu_path=qemu))
            subprocess.run(qemu_img_create_argv(spec, qemu_img), check=True, timeout=30,
                           capture_output=True)  # fmt: skip
            argv = [*_without_boot(build_qemu_argv(spec, config)), "-S"]
            with (wd / "stderr.log").open("wb") as err:
                proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err)
            deadline = time.monotonic() + 30
            while not (wd / QMP_SOCKET).exists():
                assert proc.poll() is None, (wd / "stderr.log").read_text()
                assert time.monotonic() < deadline, "no QMP socket after 30 s"
                time.sleep(0.05)
            qmp = _Qmp(wd / QMP_SOCKET, timeout=10)
            try:
                assert qmp.call("qmp_capabilities") == {}
                assert qmp.call("query-status")["status"] == "prelaunch"
                usernet = qmp.call("human-monitor-command", **{"command-line": "info usernet"})
                assert usernet.count("HOST_FORWARD") == 2
                assert (wd / AGENT_SOCKET).exists() and (wd / HOST_API_SOCKET).exists()
                qmp.call("quit")
            finally:
                qmp.close()
            assert proc.wait(timeout=10) == 0
        finally:
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
