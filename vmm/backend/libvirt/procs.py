"""The QEMU process libvirt runs for a domain, found in /proc by the domain UUID.

libvirt's API does not report the QEMU pid, and its pid file lies in libvirtd's run directory,
which may be in another mount namespace. libvirt passes ``-uuid <domain uuid>`` to every QEMU,
so the process whose command line carries it is the domain's QEMU. A found pid is cached with
its start time, so a recycled pid is never mistaken for the QEMU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class _Seen:
    pid: int
    start_ticks: int


class QemuProcesses:
    def __init__(self, proc: Path = Path("/proc")) -> None:
        self._proc = proc
        self._cache: dict[str, _Seen] = {}

    def pid_of(self, domain_uuid: str) -> int | None:
        """The live QEMU running ``domain_uuid``, or None (not running, or not on this host)."""
        seen = self._cache.get(domain_uuid)
        if seen is not None and self._start_ticks(seen.pid) == seen.start_ticks:
            return seen.pid
        self._cache = self._scan()
        seen = self._cache.get(domain_uuid)
        return seen.pid if seen is not None else None

    def started_at(self, pid: int) -> float | None:
        """The wall-clock time the process started, from its start ticks and the boot time."""
        ticks = self._start_ticks(pid)
        boot = self._boot_time()
        if ticks is None or boot is None:
            return None
        return boot + ticks / os.sysconf("SC_CLK_TCK")

    def _scan(self) -> dict[str, _Seen]:
        found = {}
        for entry in self._proc.iterdir():
            if not entry.name.isdigit():
                continue
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if not argv or b"qemu" not in Path(argv[0].decode(errors="replace")).name.encode():
                continue
            try:
                uuid = argv[argv.index(b"-uuid") + 1].decode()
            except (ValueError, IndexError):
                continue
            ticks = self._start_ticks(int(entry.name))
            if ticks is not None:
                found[uuid] = _Seen(int(entry.name), ticks)
        return found

    def _start_ticks(self, pid: int) -> int | None:
        """Field 22 of /proc/<pid>/stat, or None if the process is gone or a zombie."""
        try:
            raw = (self._proc / str(pid) / "stat").read_bytes()
        except OSError:
            return None
        # The command name may contain spaces and ")": the fixed fields follow the last ")".
        fields = raw[raw.rindex(b")") + 2 :].split()
        if fields[0] in (b"Z", b"X"):
            return None
        return int(fields[22 - 3])

    def _boot_time(self) -> float | None:
        try:
            for line in (self._proc / "stat").read_text().splitlines():
                if line.startswith("btime "):
                    return float(line.split()[1])
        except OSError:
            return None
        return None
