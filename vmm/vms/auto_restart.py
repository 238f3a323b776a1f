"""Automatic restart of VMs that should run but do not (``[cvm.auto_restart]``).

Every ``interval`` seconds (the manager's watcher calls ``tick`` after refreshing process states)
each VM is looked at:

- removing VMs, and VMs whose desired state is stopped, are left alone (and forgotten here);
- a VM that runs is healthy; after ``reset_window`` seconds of continuous health its attempt
  counter is reset, so a crash weeks later gets the full budget again;
- a VM with ``started=true`` that does not run is scheduled: the first attempt ``initial_backoff``
  seconds after it was first seen down, attempt *n+1* ``min(initial_backoff·2ⁿ, max_backoff)``
  seconds after attempt *n*. An attempt is one StartVm; it fails if StartVm refuses (the VM
  then stays down) or the VM is down again at the next due time.
- when an attempt is due and ``max_retries`` attempts were made, the event
  ``vmm.auto_restart.exhausted`` is pushed once and nothing more is tried until the VM is
  started, stopped or shut down by hand (the servicer calls ``reset``), or it runs for
  ``reset_window``.

Counters live in memory only, as in dstack: a daemon restart gives every VM a fresh budget (and
reconciliation at start starts VMs that should run anyway).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from vmm.core.config import AutoRestartConfig
from vmm.core.exceptions import VmmError
from vmm.model.vm import Vm

log = logging.getLogger(__name__)


def backoff_delay(attempts: int, initial: float, maximum: float) -> float:
    """Seconds between attempt ``attempts`` and the next: initial·2^attempts, capped."""
    return float(min(initial * 2 ** min(attempts, 62), maximum))


@dataclass
class _Track:
    attempts: int = 0
    due: float | None = None  # when the next attempt may run
    exhausted: bool = False
    healthy_since: float | None = None


class AutoRestart:
    def __init__(
        self,
        config: AutoRestartConfig,
        *,
        vms: Callable[[], Iterable[Vm]],
        start: Callable[[str], Awaitable[None]],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self._vms = vms
        self._start = start
        self._clock = clock
        self._tracks: dict[str, _Track] = {}
        self._next_check = 0.0
        # Attempts since the daemon started, by outcome (for the metrics).
        self.restarted = 0
        self.failed = 0

    def reset(self, vm_id: str) -> None:
        """A manual start, stop or shutdown: the operator is in charge again."""
        self._tracks.pop(vm_id, None)

    def attempts(self, vm_id: str) -> int:
        track = self._tracks.get(vm_id)
        return track.attempts if track else 0

    async def tick(self) -> None:
        if not self.config.enabled:
            return
        now = self._clock()
        if now < self._next_check:
            return
        self._next_check = now + self.config.interval
        await self.check(now)

    async def check(self, now: float) -> None:
        vms = list(self._vms())
        present = {vm.id for vm in vms}
        for vm_id in [i for i in self._tracks if i not in present]:
            del self._tracks[vm_id]
        for vm in vms:
            if vm.removing or not vm.started:
                self._tracks.pop(vm.id, None)
            elif vm.running:
                self._healthy(vm, now)
            else:
                await self._down(vm, now)

    def _healthy(self, vm: Vm, now: float) -> None:
        track = self._tracks.get(vm.id)
        if track is None:
            return
        if track.healthy_since is None:
            track.healthy_since = now
        elif now - track.healthy_since >= self.config.reset_window:
            log.info("VM %s ran for %ss: auto-restart counters reset", vm.id,
                     self.config.reset_window)
            del self._tracks[vm.id]

    async def _down(self, vm: Vm, now: float) -> None:
        cfg = self.config
        track = self._tracks.setdefault(vm.id, _Track())
        track.healthy_since = None
        if track.exhausted:
            return
        if track.due is None:
            track.due = now + cfg.initial_backoff
            log.info("VM %s should run but does not; restart in %ss", vm.id, cfg.initial_backoff)
            return
        if now < track.due:
            return
        if track.attempts >= cfg.max_retries:
            track.exhausted = True
            message = f"Automatic restart stopped after {track.attempts} failed attempts"
            vm.add_event("vmm.auto_restart.exhausted", message)
            log.warning("VM %s: %s", vm.id, message)
            return
        track.attempts += 1
        track.due = now + backoff_delay(track.attempts, cfg.initial_backoff, cfg.max_backoff)
        attempt = f"attempt {track.attempts} of {cfg.max_retries}"
        try:
            await self._start(vm.id)
        except Exception as exc:  # one VM's failure must not stop the others' restarts
            self.failed += 1
            reason = exc.message if isinstance(exc, VmmError) else f"{type(exc).__name__}: {exc}"
            vm.add_event("vmm.auto_restart", f"{attempt} failed: {reason}")
            log.warning("VM %s: auto-restart %s failed: %s", vm.id, attempt, reason)
            return
        self.restarted += 1
        vm.add_event("vmm.auto_restart", f"{attempt}: restarted")
        log.info("VM %s: auto-restart %s: restarted", vm.id, attempt)
