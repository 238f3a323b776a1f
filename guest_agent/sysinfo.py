"""GuestApi.SysInfo: the guest's OS, CPU, memory, load and disks, read from /proc, /sys and statvfs.

Field meanings follow what dstack's guest reports: memory in bytes, ``used`` = total - available,
load averages rounded to integers (the proto has uint32), disk ``free_size`` = space available
to unprivileged users (statvfs f_bavail).
"""

import os
import stat
from pathlib import Path

PROC = Path("/proc")
OS_RELEASE = (Path("/etc/os-release"), Path("/usr/lib/os-release"))
CPU_ONLINE = Path("/sys/devices/system/cpu/online")


def parse_os_release(text: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.strip().partition("=")
        if not sep or key.startswith("#"):
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1].replace('\\"', '"').replace("\\\\", "\\")
        fields[key] = value
    return fields


def os_release(paths: tuple[Path, ...] = OS_RELEASE) -> dict[str, str]:
    for path in paths:
        try:
            return parse_os_release(path.read_text())
        except OSError:
            continue
    return {}


def parse_cpu_list(text: str) -> int:
    """How many CPUs a sysfs CPU list such as ``0-3,6`` names."""
    count = 0
    for part in text.strip().split(","):
        if not part:
            continue
        first, _, last = part.partition("-")
        count += int(last) - int(first) + 1 if last else 1
    return count


def online_cpus(path: Path = CPU_ONLINE) -> int:
    try:
        return parse_cpu_list(path.read_text())
    except (OSError, ValueError):
        return os.cpu_count() or 1


def cpu_model(text: str) -> str:
    """The first ``model name`` of /proc/cpuinfo (x86), else another field naming the CPU."""
    fallback = ""
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        key = key.strip()
        if not sep:
            continue
        if key == "model name":
            return value.strip()
        if key in ("Model", "cpu model", "uarch", "isa") and not fallback:
            fallback = value.strip()
    return fallback


def parse_meminfo(text: str) -> dict[str, int]:
    """/proc/meminfo in bytes (the kernel prints kB, meaning KiB)."""
    values: dict[str, int] = {}
    for line in text.splitlines():
        key, sep, rest = line.partition(":")
        words = rest.split()
        if not sep or not words:
            continue
        try:
            number = int(words[0])
        except ValueError:
            continue
        values[key.strip()] = number * 1024 if len(words) > 1 and words[1] == "kB" else number
    return values


def unescape_mount_field(field: str) -> str:
    r"""Undo the octal escapes /proc/mounts uses for space, tab, newline and backslash (\040)."""
    if "\\" not in field:
        return field
    out: list[str] = []
    i = 0
    while i < len(field):
        chunk = field[i + 1 : i + 4]
        if field[i] == "\\" and len(chunk) == 3 and all(c in "01234567" for c in chunk):
            out.append(chr(int(chunk, 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def block_mounts(mounts_text: str) -> list[tuple[str, str]]:
    """(device, mount point) of the mounts backed by a /dev block device.

    Only the first mount at each place counts. /dev/root and the like (no node) count; a /dev
    node that is not a block device does not.
    """
    found: list[tuple[str, str]] = []
    seen: set[str] = set()
    for line in mounts_text.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        device, mount_point = unescape_mount_field(fields[0]), unescape_mount_field(fields[1])
        if not device.startswith("/dev/") or mount_point in seen:
            continue
        try:
            if not stat.S_ISBLK(Path(device).stat().st_mode):
                continue
        except FileNotFoundError:
            pass
        except OSError:
            continue
        seen.add(mount_point)
        found.append((device, mount_point))
    return found


def disks(mounts: Path = PROC / "mounts") -> list[dict[str, object]]:
    try:
        text = mounts.read_text()
    except OSError:
        return []
    result: list[dict[str, object]] = []
    for device, mount_point in block_mounts(text):
        try:
            st = os.statvfs(mount_point)
        except OSError:
            continue
        result.append(
            {
                "name": device,
                "mount_point": mount_point,
                "total_size": st.f_blocks * st.f_frsize,
                "free_size": st.f_bavail * st.f_frsize,
            }
        )
    return result


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def system_info(proc: Path = PROC) -> dict[str, object]:
    release = os_release()
    mem = parse_meminfo(_read(proc / "meminfo"))
    total, available = mem.get("MemTotal", 0), mem.get("MemAvailable", mem.get("MemFree", 0))
    swap_total, swap_free = mem.get("SwapTotal", 0), mem.get("SwapFree", 0)
    uptime_text = _read(proc / "uptime").split()
    load = _read(proc / "loadavg").split()

    def loadavg(i: int) -> int:
        try:
            return round(float(load[i]))
        except (IndexError, ValueError):
            return 0

    return {
        "os_name": release.get("NAME", ""),
        "os_version": release.get("VERSION_ID", release.get("VERSION", "")),
        "kernel_version": os.uname().release,
        "cpu_model": cpu_model(_read(proc / "cpuinfo")),
        "num_cpus": online_cpus(),
        "total_memory": total,
        "available_memory": available,
        "used_memory": max(total - available, 0),
        "free_memory": mem.get("MemFree", 0),
        "total_swap": swap_total,
        "used_swap": max(swap_total - swap_free, 0),
        "free_swap": swap_free,
        "uptime": int(float(uptime_text[0])) if uptime_text else 0,
        "loadavg_one": loadavg(0),
        "loadavg_five": loadavg(1),
        "loadavg_fifteen": loadavg(2),
        "disks": disks(proc / "mounts"),
    }
