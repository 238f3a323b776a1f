"""The supervisor: a long-lived process that owns the VM processes, and the daemon's client for it.

The daemon never spawns QEMU itself. It asks the supervisor (``python -m vmm.supervisor``, over
HTTP on a Unix socket) to, so VMs survive a daemon crash, restart or upgrade; and the supervisor
keeps its table on disk and re-adopts live processes, so they survive a supervisor restart too.
"""

from vmm.supervisor.client import SupervisorClient, ensure_supervisor
from vmm.supervisor.types import ProcessConfig, ProcessInfo, ProcessState, Status

__all__ = [
    "ProcessConfig",
    "ProcessInfo",
    "ProcessState",
    "Status",
    "SupervisorClient",
    "ensure_supervisor",
]
