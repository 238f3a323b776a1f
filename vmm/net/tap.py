"""TAP devices of bridge-mode NICs, made by the daemon (QEMU then opens them by name).

QEMU's ``-netdev bridge`` runs qemu-bridge-helper, which reads the fixed /etc/qemu/bridge.conf
and is setuid: the daemon (root) making a persistent TAP and enslaving it keeps both out of the
picture (reference networking §3). The name is derived from the VM id and the NIC index, so the
same NIC finds its TAP again after a daemon restart, and fits IFNAMSIZ (15 characters).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from pathlib import Path

from vmm.core.host_tool import run_host_tool

log = logging.getLogger(__name__)

SYS_NET = Path("/sys/class/net")
IP_TIMEOUT = 10.0


def tap_name(vm_id: str, index: int) -> str:
    """``vt<8 hex of sha256(vm id)>n<index>``: at most 15 characters for index < 100."""
    return f"vt{hashlib.sha256(vm_id.encode()).hexdigest()[:8]}n{index}"


async def _ip(*args: str) -> None:
    try:
        status, err = await run_host_tool(["ip", *args], IP_TIMEOUT)
    except TimeoutError:
        raise OSError(f"ip {' '.join(args)}: no answer within {IP_TIMEOUT:g}s") from None
    if status != 0:
        raise OSError(f"ip {' '.join(args)}: {err.decode(errors='replace').strip()}")


async def ensure_tap(name: str, bridge: str) -> None:
    """Make the TAP if missing, enslave it to ``bridge`` and bring it up (idempotent)."""
    if not (SYS_NET / name).exists():
        await _ip("tuntap", "add", "dev", name, "mode", "tap")
    await _ip("link", "set", "dev", name, "master", bridge)
    await _ip("link", "set", "dev", name, "up")


async def remove_tap(name: str) -> None:
    """Delete the TAP if it exists (a removed VM's)."""
    if (SYS_NET / name).exists():
        try:
            await _ip("tuntap", "del", "dev", name, "mode", "tap")
        except OSError as exc:
            log.warning("cannot delete TAP %s: %s", name, exc)


async def remove_taps_of(vm_id: str) -> None:
    """Delete every TAP of a VM (at removal, when its NIC list may have changed meanwhile)."""
    prefix = tap_name(vm_id, 0)[:-1]
    names = await asyncio.to_thread(lambda: sorted(p.name for p in SYS_NET.glob(prefix + "*")))
    for name in names:
        await remove_tap(name)
