"""What runs: a VM's QEMU as its backend reports it, in one shape for every backend."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

RuntimeStatus = Literal["running", "stopped", "exited", "error"]


@dataclass(frozen=True)
class Runtime:
    """One VM's QEMU as a backend sees it: enough for Status, adoption and reconciliation.

    ``status``: running; stopped (on request); exited (by itself: ``exit_code`` or ``signal``
    say how, when the backend could see it); error (it could not be started: ``error`` says why).
    ``paused``: a running QEMU whose vCPUs are stopped (PauseVm): it still holds its memory,
    CID and ports, so it counts as running everywhere but in the status a client sees.
    """

    status: RuntimeStatus
    pid: int | None = None
    started_at: float | None = None  # wall-clock seconds, for uptime
    stopped_at: float | None = None
    exit_code: int | None = None
    signal: int | None = None
    error: str = ""
    name: str = ""  # the VM's name as the backend recorded it, for logs about orphans
    cid: int | None = None  # the vsock CID it runs with; kept across daemon restarts
    is_vm: bool = True  # False for other processes a backend may run (temporary helpers)
    paused: bool = False

    @property
    def running(self) -> bool:
        return self.status == "running"

    def how_it_ended(self) -> str:
        if self.exit_code is not None:
            return f"exit code {self.exit_code}"
        if self.signal is not None:
            return f"signal {self.signal}"
        return self.error or "unknown"
