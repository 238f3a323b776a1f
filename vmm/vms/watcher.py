"""The watcher: each second, bring every VM's runtime state up to date, then run the duties.

Status never asks the backend; it reports what the last round learned. The duties (auto-restart,
log rotation, bridge forwards) run after the refresh, each in its own try, so one that fails is
logged and the others still run.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping

from vmm.core.exceptions import BackendError, Unavailable
from vmm.model.runtime import Runtime
from vmm.model.vm import Vm

log = logging.getLogger(__name__)

WATCH_INTERVAL = 1.0


async def watch(refresh: Callable[[], Awaitable[None]],
                duties: Iterable[Callable[[], Awaitable[None]]],
                interval: float = WATCH_INTERVAL) -> None:
    """Run forever (until cancelled): ``refresh``, then each duty, then sleep ``interval``."""
    duties = tuple(duties)
    while True:
        try:
            await refresh()
        except (BackendError, Unavailable) as exc:
            log.warning("cannot refresh VM states: %s", exc.message)
        except Exception:
            log.exception("refreshing VM states failed")
        for duty in duties:
            try:
                await duty()
            except Exception:
                log.exception("watcher duty %s failed", duty.__qualname__)
        await asyncio.sleep(interval)


async def refresh_runtimes(vms: Mapping[str, Vm],
                           runtimes: Callable[[], Awaitable[dict[str, Runtime]]],
                           exited: Callable[[Vm], Awaitable[None]]) -> None:
    """Apply the backend's listing to each VM; ``exited`` runs for a VM seen to stop by itself.

    A VM that changed while the backend was asked (a StartVm or StopVm finished meanwhile)
    keeps what its call recorded: the listing may predate it. The next round reads it.
    """
    asked = {vm_id: vm.version for vm_id, vm in vms.items()}
    listing = await runtimes()
    for vm in list(vms.values()):
        if asked.get(vm.id) != vm.version:
            continue
        before = vm.running
        vm.runtime = listing.get(vm.id)
        if before and not vm.running and vm.runtime is not None:
            vm.add_event("vmm.exited", f"QEMU {vm.runtime.status} ({vm.runtime.how_it_ended()})")
            await exited(vm)
