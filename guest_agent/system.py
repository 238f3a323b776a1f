"""Thin wrappers over the Linux system calls and files the agent needs (stdlib + ctypes)."""

import ctypes
import os
import socket
from pathlib import Path

MS_RDONLY = 0x1
MS_REMOUNT = 0x20
LINUX_REBOOT_CMD_POWER_OFF = 0x4321FEDC

_libc: ctypes.CDLL | None = None


def _load_libc() -> ctypes.CDLL:
    global _libc  # noqa: PLW0603 - one lazily loaded handle per process
    if _libc is None:
        # dlopen(NULL): python itself links libc, and ctypes.util is slow to import.
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def mount(source: str, target: Path, fstype: str, flags: int = 0, data: str = "") -> None:
    """Mount a filesystem with the mount system call; raise OSError on failure."""
    libc = _load_libc()
    rc = libc.mount(
        source.encode(),
        os.fsencode(target),
        fstype.encode(),
        ctypes.c_ulong(flags),
        data.encode() if data else None,
    )
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {source} on {target} ({fstype}): {os.strerror(err)}")


def reboot_power_off() -> None:
    """Call reboot(2) with LINUX_REBOOT_CMD_POWER_OFF; returns only on failure (raises)."""
    libc = _load_libc()
    rc = libc.reboot(ctypes.c_int(LINUX_REBOOT_CMD_POWER_OFF))
    err = ctypes.get_errno()
    raise OSError(err, f"reboot(POWER_OFF) returned {rc}: {os.strerror(err)}")


def parse_uptime(text: str) -> float:
    """Return the seconds since boot from the text of /proc/uptime."""
    return float(text.split(maxsplit=1)[0])


def uptime(proc_uptime: Path = Path("/proc/uptime")) -> float:
    return parse_uptime(proc_uptime.read_text())


def hostname() -> str:
    return socket.gethostname()
