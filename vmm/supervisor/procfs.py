"""What /proc says about a pid, used to tell a process we spawned from one that reused its pid."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ProcStat:
    state: str
    """One letter: R, S, D, Z (zombie), T ..."""
    start_ticks: int
    """Field 22 of /proc/<pid>/stat: when the process started, in clock ticks since boot.

    A pid together with its start time names one process for the life of the machine.
    """

    @property
    def zombie(self) -> bool:
        return self.state in ("Z", "X")


def read_stat(pid: int) -> ProcStat | None:
    """Return the process's state and start time, or None if no such process exists."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) is in parentheses and may itself contain spaces and ")",
    # so the fixed fields start after the LAST ")".
    rest = raw[raw.rindex(b")") + 2 :].split()
    # rest[0] is field 3 (state), so field N is rest[N - 3].
    return ProcStat(state=rest[0].decode(), start_ticks=int(rest[22 - 3]))
