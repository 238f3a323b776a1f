"""The libvirt domain XML: golden files per case, targeted rules, and libvirt's own schema.

Regenerate the golden files after an intended change with
``VMM_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/backend/libvirt/test_domain_xml.py``
and review the diff; a normal run only compares.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from tests.backend.libvirt.cases import (
    CASES,
    CPULIST,
    IMG,
    WD,
    dev_case,
    extras_case,
    gpus_case,
    make_image,
    ports_case,
    with_cvm,
)
from tests.support.short_dirs import short_dir
from vmm.backend.base import LaunchSpec
from vmm.backend.libvirt.domain import (
    QEMU_NS,
    VMM_NS,
    DomainMeta,
    build_domain_xml,
    domain_uuid,
    parse_meta,
)
from vmm.backend.libvirt.support import libvirt_version_tuple, unsupported_features
from vmm.backend.qemu.argv import build_qemu_argv
from vmm.core.config import Config, NetworkingConfig, ProductConfig
from vmm.model.manifest import Network
from vmm.net.nics import resolve_networks

GOLDEN = Path(__file__).parent / "golden"
UPDATE_GOLDEN = os.environ.get("VMM_UPDATE_GOLDEN") == "1"
Case = Callable[[], tuple[LaunchSpec, Config]]
LIBVIRT_9 = (9, 0, 0)


def golden_text(xml: str) -> str:
    return xml.replace(str(WD), "{wd}").replace(str(IMG), "{img}")


def parse(xml: str) -> ET.Element:
    return ET.fromstring(xml)


def qemu_args(root: ET.Element) -> list[str]:
    return [arg.attrib["value"] for arg in root.iter(f"{{{QEMU_NS}}}arg")]


def after(args: list[str], flag: str) -> list[str]:
    return [value for f, value in itertools.pairwise(args) if f == flag]


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden_domain_xml(name: str) -> None:
    """Each case's full domain XML matches its golden file byte for byte."""
    text = golden_text(build_domain_xml(*CASES[name]()))
    path = GOLDEN / f"{name}.xml"
    if UPDATE_GOLDEN:
        path.write_text(text)
    assert text == path.read_text(), f"domain XML differs from {path}; see the module docstring"


@pytest.mark.parametrize("name", sorted(CASES))
def test_domain_xml_validates_against_libvirt_schema(name: str) -> None:
    """virt-xml-validate (libvirt's RelaxNG schema, libvirt-clients) accepts every case."""
    if not shutil.which("virt-xml-validate") or not shutil.which("xmllint"):
        pytest.skip("virt-xml-validate or xmllint is not installed (scripts/install adds them)")
    with short_dir("lvx") as tmp:
        path = tmp / "domain.xml"
        path.write_text(build_domain_xml(*CASES[name]()))
        result = subprocess.run(["virt-xml-validate", str(path), "domain"], capture_output=True,
                                text=True, timeout=60, check=False)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_channels_use_the_qemu_backend_sockets() -> None:
    """The two virtio-serial ports bind the same Unix sockets and names as the QEMU argv."""
    spec, config = dev_case()
    root = parse(build_domain_xml(spec, config))
    channels = [(c.find("source").attrib, c.find("target").attrib)  # type: ignore[union-attr]
                for c in root.iter("channel")]  # fmt: skip
    assert channels == [
        ({"mode": "bind", "path": f"{WD}/agent.sock"},
         {"type": "virtio", "name": "org.vmm.guest-agent"}),
        ({"mode": "bind", "path": f"{WD}/host-api.sock"},
         {"type": "virtio", "name": "org.vmm.host-api"}),
    ]  # fmt: skip
    argv = build_qemu_argv(spec, config)
    assert f"socket,id=agentch,path={WD}/agent.sock,server=on,wait=off" in argv
    assert root.find("devices/vsock") is None


def test_user_nic_netdev_equals_the_qemu_argv() -> None:
    """The injected -netdev of a user NIC is the QEMU backend's, hostfwd and dhcpstart included."""
    for case in (dev_case, ports_case, extras_case):
        spec, config = case()
        argv = build_qemu_argv(replace(spec, host=replace(spec.host, channel="serial")), config)
        assert after(qemu_args(parse(build_domain_xml(spec, config))), "-netdev") == [
            v for v in after(argv, "-netdev") if v.startswith("user,")
        ]
    args = qemu_args(parse(build_domain_xml(*ports_case())))
    assert after(args, "-netdev")[0].endswith(
        ",restrict=yes,hostfwd=tcp:127.0.0.1:18080-:8000,hostfwd=udp:10.9.8.7:18080-:53")


def test_a_forward_that_would_leave_its_option_is_refused() -> None:
    """A host address carrying QEMU option text never reaches the injected -netdev."""
    spec, config = ports_case()
    evil = replace(spec.manifest.port_map[0], address="::1%x,guestfwd=tcp:10.0.2.100:1234-cmd:id")
    spec = replace(spec, manifest=replace(spec.manifest, port_map=(evil,)))
    with pytest.raises(ValueError, match="not a plain IP address literal"):
        build_domain_xml(spec, config)


def test_injected_devices_sit_on_high_pcie0_slots() -> None:
    """Injected PCI devices take pcie.0 slots 0x18 up, clear of libvirt's root ports."""
    spec, config = extras_case()
    mac = resolve_networks(spec.manifest, config.cvm.networking)[0].mac
    devices = after(qemu_args(parse(build_domain_xml(spec, config))), "-device")
    assert devices == [
        f"virtio-net-pci,netdev=net0,mac={mac},bus=pcie.0,addr=0x18",
        "tpm-tis,tpmdev=tpm0",
        "virtio-blk-pci,drive=vvfat0,bus=pcie.0,addr=0x19",
    ]
    nets = tuple(Network(mode="user") for _ in range(8))
    spec = replace(spec, manifest=spec.manifest.evolve(networks=nets))
    with pytest.raises(ValueError, match="too many injected PCI devices"):
        build_domain_xml(spec, config)


def test_bridge_nic_is_a_libvirt_interface() -> None:
    """A bridge NIC becomes <interface type='bridge'> with the derived MAC, not an injection."""
    spec, config = extras_case()
    root = parse(build_domain_xml(spec, config))
    (interface,) = root.iter("interface")
    assert interface.attrib == {"type": "bridge"}
    assert interface.find("source").attrib == {"bridge": "br-cvm"}  # type: ignore[union-attr]
    mac = resolve_networks(spec.manifest, config.cvm.networking)[1].mac
    assert interface.find("mac").attrib == {"address": mac}  # type: ignore[union-attr]


def test_values_are_escaped_not_formatted() -> None:
    """Quotes, <, & and commas in paths and SMBIOS strings survive as data, never as markup."""
    nasty = Path("/srv/vm's \"dir\" <&>,x")
    spec, config = extras_case()
    spec = replace(spec, workdir=nasty)
    config = with_cvm(config, product=replace(config.cvm.product, sys_vendor="a<b>&'\"c"))
    root = parse(build_domain_xml(spec, config))
    assert root.find("devices/serial/log").attrib["file"] == f"{nasty}/serial.log"  # type: ignore[union-attr]
    assert root.findtext("sysinfo/system/entry[@name='manufacturer']") == "a<b>&'\"c"
    assert root.findtext("sysinfo/bios/entry[@name='vendor']") == "Acme & Sons <lab>"
    # Injected QEMU options double their commas, as QEMU's option parser needs.
    args = qemu_args(root)
    assert "socket,id=chrtpm,path=/srv/vm's \"dir\" <&>,,x/swtpm/swtpm.sock" in args
    assert any(",dir=/srv/vm's \"dir\" <&>,,x/shared,label=DSTACKSHR" in a for a in args)


def test_gpus_get_root_ports_on_their_numa_expander() -> None:
    """Each GPU's root port sits on the pxb-pcie of its host node; the NVSwitch on pcie.0."""
    root = parse(build_domain_xml(*gpus_case()))
    controllers = {c.attrib["index"]: c for c in root.iter("controller") if c.get("type") == "pci"}
    expanders = {c.findtext("target/node"): i for i, c in controllers.items()
                 if c.get("model") == "pcie-expander-bus"}  # fmt: skip
    assert expanders == {"0": "1", "1": "2"}
    hostdevs = list(root.iter("hostdev"))
    sources = [h.find("source/address").attrib["bus"] for h in hostdevs]  # type: ignore[union-attr]
    assert sources == ["0x9b", "0x18", "0x2a", "0x05"]
    port_buses = []
    for hostdev in hostdevs:
        port = controllers[str(int(hostdev.find("address").attrib["bus"], 16))]  # type: ignore[union-attr]
        assert port.get("model") == "pcie-root-port" and hostdev.get("managed") == "no"
        address = port.find("address")
        port_buses.append(address.attrib["bus"] if address is not None else "pcie.0")
    # 9b:00.0 is on host node 1 (guest node 1, expander index 2); the bridge has no NUMA place.
    assert port_buses == ["0x02", "0x01", "0x01", "pcie.0"]


def test_hugepages_sizing_matches_the_qemu_argv() -> None:
    """Two NUMA nodes: 6 vCPUs and 10 GiB in two 5 GiB shared cells, as the argv rounds them."""
    spec, config = gpus_case()
    root = parse(build_domain_xml(spec, config))
    argv = build_qemu_argv(spec, config)
    assert root.findtext("vcpu") == argv[argv.index("-smp") + 1] == "6"
    assert root.findtext("memory") == argv[argv.index("-m") + 1].rstrip("M") == "10240"
    cells = [c.attrib for c in root.iter("cell")]
    assert cells == [
        {"id": "0", "cpus": "0-2", "memory": "5", "unit": "GiB", "memAccess": "shared"},
        {"id": "1", "cpus": "3-5", "memory": "5", "unit": "GiB", "memAccess": "shared"},
    ]
    assert [m.attrib["nodeset"] for m in root.iter("memnode")] == ["0", "1"]
    assert root.find("vcpu").attrib["cpuset"] == CPULIST[1]  # type: ignore[union-attr]


def test_tcg_and_kvm_pick_domain_type_and_cpu() -> None:
    """TCG gives type 'qemu' with cpu 'maximum'; KVM gives type 'kvm', host-passthrough, split irqchip."""
    dev = parse(build_domain_xml(*dev_case()))
    assert dev.get("type") == "qemu"
    assert dev.find("cpu").attrib["mode"] == "maximum"  # type: ignore[union-attr]
    assert dev.find("features/ioapic") is None
    kvm = parse(build_domain_xml(*gpus_case()))
    assert kvm.get("type") == "kvm"
    assert kvm.find("cpu").attrib["mode"] == "host-passthrough"  # type: ignore[union-attr]
    assert kvm.find("features/ioapic").attrib == {"driver": "qemu"}  # type: ignore[union-attr]
    assert parse(build_domain_xml(*extras_case())).findtext("cpu/model") == "EPYC-v4"


def test_metadata_round_trips_and_uuid_is_stable() -> None:
    """The <vmm:vm> metadata parses back to id, CID and work dir; the UUID is derived from the id."""
    spec, config = gpus_case()
    root = parse(build_domain_xml(spec, config))
    element = root.find(f"metadata/{{{VMM_NS}}}vm")
    assert element is not None
    assert parse_meta(ET.tostring(element, encoding="unicode")) == DomainMeta(
        vm_id="0b6e5a3c-vm", cid=1007, workdir=str(WD))
    assert root.findtext("uuid") == domain_uuid("0b6e5a3c-vm") != domain_uuid("0b6e5a3c-vm2")
    as_libvirt_returns_it = "<vm><id>a-1</id><cid>3</cid><workdir>/w</workdir></vm>"
    assert parse_meta(as_libvirt_returns_it) == DomainMeta(vm_id="a-1", cid=3, workdir="/w")
    assert parse_meta("<other><id>a</id><cid>3</cid></other>") is None
    assert parse_meta("<vm><id>a</id><cid>x</cid></vm>") is None
    assert parse_meta("not xml") is None


def test_refuses_tee_relative_workdir_and_iso_rootfs() -> None:
    """TEE specs, a relative work dir and a non-verity rootfs are ValueErrors naming the cause."""
    spec, config = dev_case()
    with pytest.raises(ValueError, match="tdx"):
        build_domain_xml(replace(spec, host=replace(spec.host, accel="kvm", tee="tdx")), config)
    with pytest.raises(ValueError, match="absolute"):
        build_domain_xml(replace(spec, workdir=Path("run/vm")), config)
    with pytest.raises(ValueError, match=r"rootfs\.iso"):
        build_domain_xml(replace(spec, image=make_image(rootfs=IMG / "rootfs.iso")), config)


def test_unsupported_features_name_feature_and_backend() -> None:
    """TDX, SEV-SNP, vsock without vhost-vsock, cvm.user, product_uuid, bad dates are reported."""
    spec, config = dev_case()
    assert unsupported_features(spec, config, LIBVIRT_9) == []
    tdx = replace(spec, host=replace(spec.host, accel="kvm", tee="tdx"))
    assert unsupported_features(tdx, config, LIBVIRT_9) == [
        "TDX: libvirt 9.0.0 has no <launchSecurity type='tdx'> (libvirt backend)"]
    snp = replace(spec, host=replace(spec.host, accel="kvm", tee="sev-snp"))
    assert "added in 10.5.0" in unsupported_features(snp, config, LIBVIRT_9)[0]
    assert "not build SEV-SNP" in unsupported_features(snp, config, (10, 5, 0))[0]
    no_tee = replace(tdx, manifest=tdx.manifest.evolve(no_tee=True))
    assert unsupported_features(no_tee, config, LIBVIRT_9) == []
    vsock = replace(spec, host=replace(spec.host, channel="vsock"))
    assert unsupported_features(vsock, config, LIBVIRT_9, vhost_vsock=True) == []
    (problem,) = unsupported_features(vsock, config, LIBVIRT_9, vhost_vsock=False)
    assert problem.startswith("vsock guest channel") and "libvirt backend" in problem
    odd = with_cvm(user="cvm", product=ProductConfig(
        product_uuid="8e6c0b8a-5c3e-4f5e-9a7b-0d1e2f3a4b5c", bios_date="2024-01-02",
        bios_release="v1"))  # fmt: skip
    problems = unsupported_features(spec, odd, LIBVIRT_9)
    assert [p.split(" ")[0].rstrip(":") for p in problems] == [
        "cvm.user", "cvm.product.product_uuid", "cvm.product.bios_date",
        "cvm.product.bios_release"]  # fmt: skip
    assert all(p.endswith("(libvirt backend)") for p in problems)


def test_custom_netdevs_that_spawn_helpers_are_unsupported() -> None:
    """Custom bridge or scripted tap netdevs would be killed by libvirt's seccomp spawn=deny."""
    spec, _ = dev_case()
    spec = replace(spec, manifest=spec.manifest.evolve(networks=(Network(mode="custom"),)))
    for netdev, refused in (("bridge,id=net0,br=br0", True),
                            ("tap,id=net0,ifname=t0,script=/etc/qemu-ifup", True),
                            ("tap,id=net0,ifname=t0,script=no,downscript=no", False),
                            ("socket,id=net0,listen=:1234", False)):  # fmt: skip
        config = with_cvm(networking=NetworkingConfig(mode="custom", netdev=netdev))
        problems = unsupported_features(spec, config, LIBVIRT_9)
        assert bool(problems) == refused, netdev
        if refused:
            assert problems[0].startswith("networks[0]: custom netdev") and "seccomp" in problems[0]


def test_libvirt_version_decoding() -> None:
    """libvirt's encoded version 9000000 is 9.0.0 and 10005001 is 10.5.1."""
    assert libvirt_version_tuple(9_000_000) == (9, 0, 0)
    assert libvirt_version_tuple(10_005_001) == (10, 5, 1)
