"""DHCP leases of VMs' NICs, as dnsmasq's hook (``scripts/dhcp-notify``) reports them.

dstack kept one guest IP per VM and acted on ``add`` only, so a destroyed VM's lease or an
expired one stayed in force (reference §11, PR #795). Here a lease is keyed by (VM, NIC index),
found by the NIC's MAC among the VMs that exist now; a MAC of no VM is ignored and logged. ``del``
drops the lease only if it still names the IP being released, so a late ``del`` of an old
address cannot undo a newer ``add``. Each VM's leases are written to its work directory, so a
daemon restart knows them; a removed VM's go with its directory.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from vmm.core.config import NetworkingConfig
from vmm.core.fsutil import atomic_write
from vmm.model.vm import Vm
from vmm.net.nics import resolve_networks

log = logging.getLogger(__name__)

LeaseEvent = Literal["add", "old", "del"]
EVENTS: tuple[LeaseEvent, ...] = ("add", "old", "del")


def event_of(text: str) -> LeaseEvent:
    """Dnsmasq's event word; empty is ``add`` (dstack's hook sends none, and only for add/old)."""
    for event in EVENTS:
        if (text or "add") == event:
            return event
    raise ValueError(f"must be one of {', '.join(EVENTS)}, got {text!r}")


@dataclass(frozen=True)
class NicRef:
    """The NIC a MAC belongs to, and where its VM keeps its leases."""

    vm_id: str
    index: int
    lease_file: Path


# Called after a NIC's lease changed: (VM id, NIC index, the new IP or None when released).
LeaseListener = Callable[[str, int, str | None], Awaitable[None]]


class LeaseBook:
    def __init__(self, find_nic: Callable[[str], NicRef | None],
                 on_change: LeaseListener | None = None) -> None:  # fmt: skip
        self._find_nic = find_nic
        self._on_change = on_change
        self._ips: dict[str, dict[int, str]] = {}

    def load(self, vm_id: str, lease_file: Path) -> None:
        """Read a VM's persisted leases (at daemon start); a broken file counts as none."""
        try:
            raw = json.loads(lease_file.read_text())
            ips = {int(k): str(v) for k, v in raw["nics"].items()}
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("VM %s: ignoring unreadable %s: %s", vm_id, lease_file.name, exc)
            return
        if ips:
            self._ips[vm_id] = ips

    def ips(self, vm_id: str) -> dict[int, str]:
        """The leased IP of each of the VM's NICs that has one, by NIC index."""
        return dict(self._ips.get(vm_id, {}))

    def forget(self, vm_id: str) -> None:
        """Drop a removed VM's leases (its file goes with its work directory)."""
        self._ips.pop(vm_id, None)

    async def report(self, event: LeaseEvent, mac: str, ip: str) -> NicRef | None:
        """Record one dnsmasq event; return the NIC it concerned, None if no VM owns the MAC."""
        nic = self._find_nic(mac)
        if nic is None:
            log.info("DHCP %s %s -> %s ignored: no VM has this MAC", event, mac, ip)
            return None
        current = self._ips.get(nic.vm_id, {})
        if event == "del":
            if current.get(nic.index) != ip:
                log.info("DHCP del %s for VM %s NIC %d ignored: its lease is %s", ip, nic.vm_id,
                         nic.index, current.get(nic.index, "none"))  # fmt: skip
                return nic
            new_ip: str | None = None
        else:
            if current.get(nic.index) == ip:
                return nic  # a renewal ("old") of the lease we have: nothing moves
            new_ip = ip
        updated = {k: v for k, v in current.items() if k != nic.index}
        if new_ip is not None:
            updated[nic.index] = new_ip
        data = json.dumps({"nics": {str(k): v for k, v in sorted(updated.items())}})
        await asyncio.to_thread(atomic_write, nic.lease_file, data.encode() + b"\n")
        if updated:
            self._ips[nic.vm_id] = updated
        else:
            self._ips.pop(nic.vm_id, None)
        log.info("VM %s NIC %d: DHCP %s %s (was %s)", nic.vm_id, nic.index, event, ip,
                 current.get(nic.index, "none"))  # fmt: skip
        if self._on_change is not None:
            await self._on_change(nic.vm_id, nic.index, new_ip)
        return nic


def nic_of_mac(vms: Iterable[Vm], networking: NetworkingConfig, mac: str) -> NicRef | None:
    """The NIC of an existing VM with this MAC; VMs being removed own no lease any more."""
    for vm in vms:
        if vm.removing:
            continue
        try:
            nics = resolve_networks(vm.manifest, networking)
        except ValueError:
            continue
        for nic in nics:
            if nic.mac == mac:
                return NicRef(vm.id, nic.index, vm.workdir.leases)
    return None
