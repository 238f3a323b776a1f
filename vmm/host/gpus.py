"""PCI devices for GPU passthrough: discovery from ``lspci -nn -vv``, the ListGpus filter, attachment.

Discovery parses ``lspci -nn -vv`` rather than walking sysfs because the human-readable names
(ListGpus ``description``) come only from lspci's pci.ids database. A device counts as in use when
its ``Control:`` line shows ``BusMaster+``: a GPU driven by the host driver or by a running VM's
vfio-pci has bus mastering on, an idle vfio-bound one has it off.

Slots are kept the way lspci prints them without ``-D`` (``18:00.0``); the ``0000:`` domain is
dropped so ``lspci`` and ``lspci -D`` output give the same slots, while a non-zero domain is kept
because dropping it would merge distinct devices.

A slot that reaches a path or the QEMU command line may contain only hex digits, ``:`` and ``.``.
"""

from __future__ import annotations

import logging
import re
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path

from vmm.core.config import GpuConfig
from vmm.core.exceptions import Conflict, InvalidField
from vmm.model.manifest import GpuAttachment

log = logging.getLogger(__name__)

NVIDIA_VENDOR_ID = "10de"

_SLOT_CHARS = re.compile(r"[0-9A-Fa-f:.]+")
_HEADER = re.compile(
    r"(?:(?P<domain>[0-9a-fA-F]{4,8}):)?(?P<slot>[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7])\s+"
    r"(?P<class_name>.*?)\s*\[(?P<class_id>[0-9a-fA-F]{4})\]:\s*(?P<rest>.*)"
)
# Anchored on the end of the line: a product name may itself contain brackets ("GH100 [H200 SXM
# 141GB]"), but only the ids are followed by nothing but "(rev ..)" / "(prog-if .. [..])".
_IDS_TAIL = re.compile(
    r"\s*\[(?P<vendor>[0-9a-fA-F]{4}):(?P<product>[0-9a-fA-F]{4})\]"
    r"(?:\s+\((?:rev [0-9a-fA-F]+|prog-if [0-9a-fA-F]+(?: \[[^\]]*\])?)\))*\s*$"
)
# lspci fills an unknown product's name with the placeholder word "Device" (after the vendor, or
# alone when the vendor is unknown too); it says nothing, so the description leaves it out.
_PLACEHOLDER = re.compile(r"(?:^|\s+)Device$")


@dataclass(frozen=True)
class PciDevice:
    """One PCI function as ``lspci -nn -vv`` describes it.

    ``description`` is ``"<class name>: <vendor and product name>"`` with lspci's placeholder
    word ``Device`` and the ``[vvvv:pppp]``, ``(rev ..)`` and ``(prog-if ..)`` tail removed, e.g.
    ``"3D controller: NVIDIA Corporation GH100 [H200 SXM 141GB]"`` or, for a product pci.ids does
    not name, ``"Bridge: NVIDIA Corporation"``. Hex ids are lower-case.
    """

    slot: str
    class_name: str
    class_id: str
    vendor_id: str
    product_id: str
    description: str
    bus_master: bool

    @property
    def pci_id(self) -> str:
        """``vendor:product``, the form ``[cvm.gpu] listing`` and ListGpus ``product_id`` use."""
        return f"{self.vendor_id}:{self.product_id}"

    @property
    def in_use(self) -> bool:
        return self.bus_master

    @property
    def is_free(self) -> bool:
        return not self.bus_master


def _normalize_slot(slot: str) -> str:
    """Lower-case, without the ``0000:`` domain: the form lspci prints and config lists compare in."""
    slot = slot.strip().lower()
    if slot.count(":") == 2 and slot.startswith("0000:"):
        return slot[len("0000:") :]
    return slot


def _check_slot(slot: str, field: str = "gpus") -> None:
    # Slots go into sysfs paths and onto the QEMU command line; this keeps '/', ',', '=' and
    # whitespace out of both.
    if not _SLOT_CHARS.fullmatch(slot):
        raise InvalidField(field, f"bad PCI slot {slot!r}: only hex digits, ':' and '.' are allowed")


def _parse_header(line: str) -> PciDevice | None:
    header = _HEADER.fullmatch(line.rstrip())
    if header is None:
        return None
    rest = header["rest"]
    ids = _IDS_TAIL.search(rest)
    if ids is None:
        return None
    name = _PLACEHOLDER.sub("", rest[: ids.start()].strip())
    class_name = header["class_name"]
    domain = (header["domain"] or "0000").lower()
    slot = header["slot"].lower()
    return PciDevice(
        slot=slot if int(domain, 16) == 0 else f"{domain}:{slot}",
        class_name=class_name,
        class_id=header["class_id"].lower(),
        vendor_id=ids["vendor"].lower(),
        product_id=ids["product"].lower(),
        description=f"{class_name}: {name}" if name else class_name,
        bus_master=False,
    )


def parse_lspci(text: str) -> list[PciDevice]:
    """The devices in ``lspci -nn -vv`` output, in lspci's order.

    A header line that is not in the ``-nn`` form is skipped together with its indented lines, so
    one odd device never hides the rest. ``bus_master`` comes from the device's ``Control:`` line;
    a device without one (lspci could not read its config space) counts as free.
    """
    devices: list[PciDevice] = []
    current: PciDevice | None = None
    for line in text.splitlines():
        if not line.strip():
            continue
        if not line[0].isspace():
            if current is not None:
                devices.append(current)
            current = _parse_header(line)
            if current is None:
                log.debug("lspci: skipping unrecognised device line %r", line)
            continue
        if current is None:
            continue
        words = line.split()
        if words[0] == "Control:":
            current = replace(current, bus_master="BusMaster+" in words[1:])
    if current is not None:
        devices.append(current)
    return devices


def read_lspci(lspci: str = "lspci", timeout: float = 10.0) -> str:
    """The stdout of ``lspci -nn -vv``, or ``""`` (with a logged reason) if it cannot be had.

    Blocking: call it from a worker thread in async code. A host without pciutils is a host
    without GPUs as far as ListGpus is concerned, so every failure is logged rather than raised.
    """
    try:
        result = subprocess.run(
            [lspci, "-nn", "-vv"], capture_output=True, text=True, timeout=timeout, check=False
        )
    except FileNotFoundError:
        log.warning("GPU discovery: %s not found (install pciutils); no PCI devices listed", lspci)
        return ""
    except subprocess.TimeoutExpired:
        log.warning("GPU discovery: %s -nn -vv did not finish in %.1f s", lspci, timeout)
        return ""
    except OSError as exc:
        log.warning("GPU discovery: cannot run %s: %s", lspci, exc)
        return ""
    if result.returncode != 0:
        log.warning(
            "GPU discovery: %s -nn -vv exited with %d: %s",
            lspci,
            result.returncode,
            result.stderr.strip()[:500],
        )
        return ""
    if result.stderr.strip():
        # lspci prints harmless warnings (e.g. "Unable to load libkmod resources") on success.
        log.debug("lspci stderr: %s", result.stderr.strip()[:500])
    return result.stdout


def list_gpus(devices: list[PciDevice], config: GpuConfig) -> list[PciDevice]:
    """The devices ListGpus reports: ``listing`` ids, minus ``exclude``, within ``include`` if set.

    Ids and slots compare case-insensitively and slots with or without the ``0000:`` domain, so
    an operator may copy either ``lspci`` or ``lspci -D`` output into vmm.toml.
    """
    if not config.enabled:
        return []
    listing = {pci_id.strip().lower() for pci_id in config.listing}
    exclude = {_normalize_slot(s) for s in config.exclude}
    include = {_normalize_slot(s) for s in config.include}
    return [
        dev
        for dev in devices
        if dev.pci_id in listing and dev.slot not in exclude and (not include or dev.slot in include)
    ]


def resolve_attachment(
    attach: GpuAttachment | None, devices: list[PciDevice], config: GpuConfig
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The (GPU slots, NVSwitch bridge slots) a VM gets for its requested attachment.

    ``listed`` passes the requested slots through unchanged apart from the character check: the
    operator's choice is not second-guessed against ``listing`` (dstack behaves the same way).
    A ``listed`` request that names nothing attaches nothing and is accepted even with GPUs
    disabled, since clients send an empty GPU section when none is chosen. ``all`` takes every
    NVIDIA 3D controller and every NVIDIA ``Bridge`` (NVSwitch) in lspci order; the match on
    ``Bridge`` is case-sensitive so NVIDIA's "PCI bridge" switch ports are never passed through.
    """
    if attach is None:
        return (), ()
    if attach.attach_mode == "listed":
        gpus = tuple(spec.slot for spec in attach.gpus)
        bridges = tuple(spec.slot for spec in attach.bridges)
        if (gpus or bridges) and not config.enabled:
            raise Conflict("GPU is not enabled")
        for slot in (*gpus, *bridges):
            _check_slot(slot)
        return gpus, bridges
    if attach.attach_mode == "all":
        if not config.enabled:
            raise Conflict("GPU is not enabled")
        if not config.allow_attach_all:
            raise Conflict("Attaching all GPUs is not allowed")
        nvidia = [dev for dev in devices if dev.vendor_id == NVIDIA_VENDOR_ID]
        return (
            tuple(dev.slot for dev in nvidia if "3D controller" in dev.class_name),
            tuple(dev.slot for dev in nvidia if "Bridge" in dev.class_name),
        )
    raise InvalidField("attach_mode", f"Invalid GPU attach mode: {attach.attach_mode}")


def numa_node_of(slot: str, sysfs: Path = Path("/sys/bus/pci/devices")) -> int:
    """The host NUMA node of a PCI device, from ``<sysfs>/0000:<slot>/numa_node``.

    ``-1`` (no NUMA affinity, as on single-node hosts) and a missing or unreadable file give node
    0, the node QEMU is placed on when nothing better is known. The slot is checked before any
    path is built; together with the ``0000:`` prefix that keeps the lookup a single directory
    entry under ``sysfs`` (never ``.`` or ``..``).
    """
    _check_slot(slot)
    slot = slot.lower()
    entry = slot if slot.count(":") == 2 else f"0000:{slot}"
    path = sysfs / entry / "numa_node"
    try:
        text = path.read_text().strip()
    except OSError:
        return 0
    try:
        node = int(text)
    except ValueError:
        log.warning("%s holds %r, not a NUMA node number; using node 0", path, text)
        return 0
    return max(node, 0)
