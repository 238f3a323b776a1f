"""GPU discovery and attachment: lspci parsing (real and fixture output), ListGpus filter, NUMA lookup.

The test machine has no GPUs, so GPU behaviour is pinned with the hand-assembled H200 sample in
tests/host/fixtures/gpus/ (see its README) and sysfs trees built in tmp_path; the real machine's lspci
output and /sys/bus/pci/devices check that the parser agrees with the kernel.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from vmm.core.config import GpuConfig
from vmm.core.exceptions import Conflict, InvalidField
from vmm.host.gpus import (
    PciDevice,
    list_gpus,
    numa_node_of,
    parse_lspci,
    read_lspci,
    resolve_attachment,
)
from vmm.model.manifest import GpuAttachment, GpuSpec

FIXTURES = Path(__file__).parent / "fixtures" / "gpus"
SYSFS_PCI = Path("/sys/bus/pci/devices")

H200_GPUS = ("18:00.0", "2a:00.0", "9a:00.0", "ab:00.0")
H200_SWITCHES = ("05:00.0", "06:00.0")
NOT_ALLOWED = "Attaching all GPUs is not allowed"


def _fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


@pytest.fixture(scope="module")
def virtio() -> list[PciDevice]:
    return parse_lspci(_fixture("lspci-virtio.txt"))


@pytest.fixture(scope="module")
def h200() -> list[PciDevice]:
    return parse_lspci(_fixture("lspci-h200.txt"))


ENABLED = GpuConfig(enabled=True)


def _listed(*gpus: str, bridges: tuple[str, ...] = ()) -> GpuAttachment:
    return GpuAttachment(
        attach_mode="listed",
        gpus=tuple(GpuSpec(slot=s) for s in gpus),
        bridges=tuple(GpuSpec(slot=s) for s in bridges),
    )


# --- parsing: the real machine ----------------------------------------------------------------


def test_virtio_fixture_devices(virtio: list[PciDevice]) -> None:
    """The recorded lspci -nn -vv of the test machine yields its six devices with ids and classes."""
    assert [(d.slot, d.class_id, d.vendor_id, d.product_id) for d in virtio] == [
        ("00:00.0", "0600", "8086", "0d57"),
        ("00:01.0", "ffff", "1af4", "1045"),
        ("00:02.0", "0180", "1af4", "1042"),
        ("00:03.0", "0200", "1af4", "1041"),
        ("00:04.0", "ffff", "1af4", "1053"),
        ("00:05.0", "ffff", "1af4", "1044"),
    ]
    assert [d.class_name for d in virtio] == [
        "Host bridge",
        "Unassigned class",
        "Mass storage controller",
        "Ethernet controller",
        "Unassigned class",
        "Unassigned class",
    ]


def test_virtio_fixture_bus_master(virtio: list[PciDevice]) -> None:
    """Only the host bridge has BusMaster- on its Control: line; the virtio devices are in use."""
    assert {d.slot: d.bus_master for d in virtio} == {
        "00:00.0": False,
        "00:01.0": True,
        "00:02.0": True,
        "00:03.0": True,
        "00:04.0": True,
        "00:05.0": True,
    }
    host_bridge = virtio[0]
    assert host_bridge.is_free
    assert not host_bridge.in_use
    assert all(d.in_use and not d.is_free for d in virtio[1:])


def test_virtio_fixture_descriptions(virtio: list[PciDevice]) -> None:
    """Descriptions are "<class>: <name>" without the placeholder word Device, ids, or revision."""
    assert virtio[0].description == "Host bridge: Intel Corporation"
    assert virtio[2].description == "Mass storage controller: Red Hat, Inc. Virtio 1.0 block device"
    assert virtio[1].pci_id == "1af4:1045"


def test_domain_prefixed_slots_parse_the_same(virtio: list[PciDevice]) -> None:
    """lspci -D style "0000:" prefixes are dropped, so -D output gives the same devices."""
    lines = _fixture("lspci-virtio.txt").splitlines()
    with_domain = "\n".join(f"0000:{ln}" if ln and not ln[0].isspace() else ln for ln in lines)
    assert parse_lspci(with_domain) == virtio


def test_nonzero_domain_is_kept() -> None:
    """A device in PCI domain 0001 keeps its domain so it cannot collide with 0000's slot."""
    text = (
        "0001:00:00.0 Host bridge [0600]: Intel Corporation Device [8086:0d57]\n"
        "\tControl: I/O- Mem- BusMaster- SpecCycle- MemWINV- VGASnoop- ParErr- Stepping- SERR-\n"
    )
    [dev] = parse_lspci(text)
    assert dev.slot == "0001:00:00.0"


def test_unrecognised_device_lines_are_skipped(virtio: list[PciDevice]) -> None:
    """Plain `lspci` (no -nn) headers and their indented lines are skipped without harming others."""
    text = (
        "00:1f.0 ISA bridge: Intel Corporation Device 0d58\n"
        "\tControl: I/O+ Mem+ BusMaster+ SpecCycle- MemWINV- VGASnoop- ParErr- Stepping- SERR-\n"
        "\n" + _fixture("lspci-virtio.txt")
    )
    assert parse_lspci(text) == virtio
    assert parse_lspci("") == []


@pytest.mark.skipif(shutil.which("lspci") is None, reason="pciutils (lspci) is not installed")
@pytest.mark.skipif(not SYSFS_PCI.is_dir(), reason="no /sys/bus/pci/devices")
def test_real_lspci_agrees_with_sysfs() -> None:
    """Running lspci -nn -vv here parses to exactly the sysfs PCI devices, with sysfs's vendor ids."""
    devices = parse_lspci(read_lspci())
    assert devices, "lspci printed no device this parser recognises"
    from_sysfs = {
        entry.name.removeprefix("0000:"): (entry / "vendor").read_text().strip().removeprefix("0x")
        for entry in SYSFS_PCI.iterdir()
    }
    assert {d.slot: d.vendor_id for d in devices} == from_sysfs
    assert len(devices) == len(from_sysfs)


# --- read_lspci ---------------------------------------------------------------------------------


def _script(tmp_path: Path, body: str) -> str:
    path = tmp_path / "fake-lspci"
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return str(path)


def test_read_lspci_runs_nn_vv(tmp_path: Path) -> None:
    """read_lspci passes exactly -nn -vv and returns stdout, ignoring stderr warnings on success."""
    lspci = _script(tmp_path, 'echo "args: $*"\necho "warning" >&2\n')
    assert read_lspci(lspci) == "args: -nn -vv\n"


def test_read_lspci_missing_binary(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A missing lspci gives "" and a warning naming it, not an exception."""
    missing = str(tmp_path / "no-such-lspci")
    with caplog.at_level(logging.WARNING, logger="vmm.host.gpus"):
        assert read_lspci(missing) == ""
    assert "not found" in caplog.text
    assert missing in caplog.text


def test_read_lspci_failure(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A failing lspci gives "" and logs its exit status and stderr."""
    lspci = _script(tmp_path, 'echo "partial"\necho "pcilib: cannot open /sys/bus/pci" >&2\nexit 1\n')
    with caplog.at_level(logging.WARNING, logger="vmm.host.gpus"):
        assert read_lspci(lspci) == ""
    assert "exited with 1" in caplog.text
    assert "cannot open /sys/bus/pci" in caplog.text


def test_read_lspci_timeout(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A hung lspci is abandoned after the timeout and gives ""."""
    lspci = _script(tmp_path, "exec sleep 30\n")
    with caplog.at_level(logging.WARNING, logger="vmm.host.gpus"):
        assert read_lspci(lspci, timeout=0.3) == ""
    assert "did not finish" in caplog.text


@pytest.mark.skipif(shutil.which("lspci") is None, reason="pciutils (lspci) is not installed")
def test_read_lspci_matches_direct_run() -> None:
    """read_lspci returns what lspci -nn -vv prints on stdout."""
    direct = subprocess.run(["lspci", "-nn", "-vv"], capture_output=True, text=True, check=True)
    assert read_lspci() == direct.stdout


# --- parsing: the H200 sample -------------------------------------------------------------------


def test_h200_fixture_devices(h200: list[PciDevice]) -> None:
    """The H200 sample yields 8 devices: VGA, 2 NVSwitches, ConnectX-7 and 4 H200 GPUs, in order."""
    assert [(d.slot, d.class_id, d.pci_id) for d in h200] == [
        ("03:00.0", "0300", "1a03:2000"),
        ("05:00.0", "0680", "10de:22a3"),
        ("06:00.0", "0680", "10de:22a3"),
        ("0c:00.0", "0207", "15b3:1021"),
        ("18:00.0", "0302", "10de:2335"),
        ("2a:00.0", "0302", "10de:2335"),
        ("9a:00.0", "0302", "10de:2335"),
        ("ab:00.0", "0302", "10de:2335"),
    ]


def test_h200_descriptions(h200: list[PciDevice]) -> None:
    """Product names keep their own brackets; the NVSwitch's placeholder "Device" and prog-if go."""
    by_slot = {d.slot: d for d in h200}
    assert by_slot["18:00.0"].description == "3D controller: NVIDIA Corporation GH100 [H200 SXM 141GB]"
    assert by_slot["18:00.0"].class_name == "3D controller"
    assert by_slot["05:00.0"].description == "Bridge: NVIDIA Corporation"
    assert by_slot["05:00.0"].class_name == "Bridge"
    assert by_slot["03:00.0"].description == (
        "VGA compatible controller: ASPEED Technology, Inc. ASPEED Graphics Family"
    )
    assert by_slot["0c:00.0"].description == (
        "Infiniband controller: Mellanox Technologies MT2910 Family [ConnectX-7]"
    )


def test_h200_in_use(h200: list[PciDevice]) -> None:
    """BusMaster+ marks GPUs/NVSwitches in use; BusMaster- ones are free."""
    assert {d.slot for d in h200 if d.in_use} == {"03:00.0", "05:00.0", "0c:00.0", "18:00.0", "9a:00.0"}
    assert {d.slot for d in h200 if d.is_free} == {"06:00.0", "2a:00.0", "ab:00.0"}


# --- list_gpus -----------------------------------------------------------------------------------


def test_list_gpus_disabled(h200: list[PciDevice]) -> None:
    """With [cvm.gpu] enabled=false ListGpus is empty whatever the host has."""
    assert list_gpus(h200, GpuConfig()) == []
    assert list_gpus(h200, GpuConfig(enabled=False, listing=("10de:2335", "10de:22a3"))) == []


def test_list_gpus_listing(h200: list[PciDevice]) -> None:
    """Only devices whose vendor:product is in listing appear (the default lists the H200)."""
    assert [d.slot for d in list_gpus(h200, ENABLED)] == list(H200_GPUS)
    both = list_gpus(h200, replace(ENABLED, listing=("10de:2335", "10DE:22A3")))
    assert [d.slot for d in both] == [*H200_SWITCHES, *H200_GPUS]
    assert list_gpus(h200, replace(ENABLED, listing=("10de:2330",))) == []
    assert list_gpus(h200, replace(ENABLED, listing=())) == []


def test_list_gpus_exclude(h200: list[PciDevice]) -> None:
    """Slots in exclude are hidden, written with or without the 0000: domain."""
    gpus = list_gpus(h200, replace(ENABLED, exclude=("18:00.0", "0000:9A:00.0")))
    assert [d.slot for d in gpus] == ["2a:00.0", "ab:00.0"]


def test_list_gpus_include(h200: list[PciDevice]) -> None:
    """A non-empty include keeps only its slots; exclude still wins over include."""
    gpus = list_gpus(h200, replace(ENABLED, include=("2a:00.0", "0000:ab:00.0", "03:00.0")))
    assert [d.slot for d in gpus] == ["2a:00.0", "ab:00.0"]
    gpus = list_gpus(h200, replace(ENABLED, include=("2a:00.0", "ab:00.0"), exclude=("ab:00.0",)))
    assert [d.slot for d in gpus] == ["2a:00.0"]


def test_list_gpus_on_the_virtio_machine(virtio: list[PciDevice]) -> None:
    """The GPU-less test machine lists nothing even with GPUs enabled."""
    assert list_gpus(virtio, ENABLED) == []


# --- resolve_attachment --------------------------------------------------------------------------


def test_resolve_none(h200: list[PciDevice]) -> None:
    """No GPU section attaches nothing, enabled or not."""
    assert resolve_attachment(None, h200, GpuConfig()) == ((), ())
    assert resolve_attachment(None, h200, ENABLED) == ((), ())


def test_resolve_listed_verbatim(h200: list[PciDevice]) -> None:
    """listed returns the requested GPU and bridge slots unchanged, even ones lspci does not show."""
    attach = _listed("9a:00.0", "18:00.0", "0000:ff:00.0", bridges=("06:00.0",))
    assert resolve_attachment(attach, h200, ENABLED) == (
        ("9a:00.0", "18:00.0", "0000:ff:00.0"),
        ("06:00.0",),
    )


def test_resolve_listed_empty_when_disabled(h200: list[PciDevice]) -> None:
    """An empty listed request needs no GPU support: it attaches nothing."""
    assert resolve_attachment(_listed(), h200, GpuConfig()) == ((), ())


def test_resolve_all(h200: list[PciDevice]) -> None:
    """all takes every NVIDIA 3D controller as a GPU and every NVIDIA Bridge as an NVSwitch."""
    attach = GpuAttachment(attach_mode="all")
    assert resolve_attachment(attach, h200, ENABLED) == (H200_GPUS, H200_SWITCHES)
    assert resolve_attachment(attach, [], ENABLED) == ((), ())


def test_resolve_all_ignores_non_nvidia_and_pci_bridges() -> None:
    """all skips other vendors' controllers and NVIDIA's lower-case "PCI bridge" switch ports."""
    text = (
        "01:00.0 3D controller [0302]: Advanced Micro Devices, Inc. [AMD/ATI] Aqua Vanjaram "
        "[Instinct MI300X] [1002:74a1]\n"
        "02:00.0 PCI bridge [0604]: NVIDIA Corporation Device [10de:22b1] (prog-if 00 [Normal decode])\n"
        "03:00.0 3D controller [0302]: NVIDIA Corporation GH100 [H200 SXM 141GB] [10de:2335] (rev a1)\n"
    )
    devices = parse_lspci(text)
    assert [d.slot for d in devices] == ["01:00.0", "02:00.0", "03:00.0"]
    assert resolve_attachment(GpuAttachment(attach_mode="all"), devices, ENABLED) == (("03:00.0",), ())


def test_resolve_errors(h200: list[PciDevice]) -> None:
    """Requests on a GPU-disabled host and attach-all where forbidden are refused with dstack's text."""
    cases = [
        (_listed("18:00.0"), GpuConfig(), "GPU is not enabled"),
        (GpuAttachment(attach_mode="all"), GpuConfig(), "GPU is not enabled"),
        (GpuAttachment(attach_mode="all"), replace(ENABLED, allow_attach_all=False), NOT_ALLOWED),
    ]
    for attach, config, message in cases:
        with pytest.raises(Conflict) as err:
            resolve_attachment(attach, h200, config)
        assert err.value.message == message
    # The forbidden mode is only "all": a listed request still works on the same host.
    forbidding = replace(ENABLED, allow_attach_all=False)
    assert resolve_attachment(_listed("18:00.0"), h200, forbidding) == (("18:00.0",), ())


@pytest.mark.parametrize(
    "slot", ["18:00.0,addr=1", "../../etc", "18:00.0 ", "", "18:00.0\n", "0000:18:00.0/x", "zz:00.0"]
)
def test_resolve_listed_bad_slot(h200: list[PciDevice], slot: str) -> None:
    """A listed slot with anything but hex digits, ':' and '.' is an InvalidField, for GPUs and bridges."""
    with pytest.raises(InvalidField, match="only hex digits"):
        resolve_attachment(_listed(slot), h200, ENABLED)
    with pytest.raises(InvalidField, match="only hex digits"):
        resolve_attachment(_listed("18:00.0", bridges=(slot,)), h200, ENABLED)


# --- numa_node_of --------------------------------------------------------------------------------


def _sysfs(tmp_path: Path, nodes: dict[str, str]) -> Path:
    root = tmp_path / "sys" / "bus" / "pci" / "devices"
    root.mkdir(parents=True)
    for entry, value in nodes.items():
        (root / entry).mkdir()
        (root / entry / "numa_node").write_text(value)
    return root


def test_numa_node_values(tmp_path: Path) -> None:
    """numa_node 1 is node 1; -1 (no affinity) and a missing device are node 0."""
    sysfs = _sysfs(tmp_path, {"0000:9a:00.0": "1\n", "0000:18:00.0": "-1\n", "0000:2a:00.0": "0\n"})
    assert numa_node_of("9a:00.0", sysfs) == 1
    assert numa_node_of("18:00.0", sysfs) == 0
    assert numa_node_of("2a:00.0", sysfs) == 0
    assert numa_node_of("ab:00.0", sysfs) == 0
    assert numa_node_of("9a:00.0", tmp_path / "absent") == 0


def test_numa_node_slot_forms(tmp_path: Path) -> None:
    """A domain-qualified or upper-case slot finds the same sysfs entry."""
    sysfs = _sysfs(tmp_path, {"0000:9a:00.0": "1\n", "0001:05:00.0": "3\n"})
    assert numa_node_of("0000:9a:00.0", sysfs) == 1
    assert numa_node_of("9A:00.0", sysfs) == 1
    assert numa_node_of("0001:05:00.0", sysfs) == 3


def test_numa_node_garbage(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A numa_node file that is not a number gives node 0 and a warning."""
    sysfs = _sysfs(tmp_path, {"0000:9a:00.0": "banana\n"})
    with caplog.at_level(logging.WARNING, logger="vmm.host.gpus"):
        assert numa_node_of("9a:00.0", sysfs) == 0
    assert "banana" in caplog.text


def test_numa_node_of_real_sysfs() -> None:
    """Every device on this machine resolves to a node >= 0 through the real /sys tree."""
    if not SYSFS_PCI.is_dir():
        pytest.skip("no /sys/bus/pci/devices")
    for entry in SYSFS_PCI.iterdir():
        raw = int((entry / "numa_node").read_text())
        assert numa_node_of(entry.name.removeprefix("0000:")) == max(raw, 0)


@pytest.mark.parametrize("slot", ["../../../numa", "..", "../x", "9a:00.0/../../..", "", " 9a:00.0"])
def test_numa_node_no_path_escape(tmp_path: Path, slot: str) -> None:
    """Bad slots are refused before a path is built; "." and ".." can never name a sysfs parent."""
    sysfs = _sysfs(tmp_path, {"0000:9a:00.0": "1\n"})
    # Planted where an escaping path would land: the parent of sysfs and the filesystem root side.
    (sysfs.parent / "numa_node").write_text("7\n")
    (tmp_path / "numa").write_text("7\n")
    if slot == "..":
        # Only hex/':'/'.', so it passes the check, but it becomes the entry name "0000:..".
        assert numa_node_of(slot, sysfs) == 0
        return
    with pytest.raises(InvalidField, match="only hex digits"):
        numa_node_of(slot, sysfs)
