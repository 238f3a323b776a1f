"""Fair share of the event loop for mutating calls under any read load.

The daemon serves every request on one event loop. asyncio runs, in each turn of the loop,
every callback that was ready when the turn began: with 200 clients reading, a turn runs up to
200 reads, and a lifecycle call (CreateVm, UpdateVm, ...) that awaits N times (a lock, a worker
thread, a backend call) waits N whole turns: seconds, behind reads that arrived after it.

``ReadGate`` bounds the reads that may *start* in one turn: ``per_turn``, or only
``per_turn_writing`` while a call that is not a read is in flight (``run`` counts them). A read
beyond it waits in a FIFO queue and is let in at a later turn; nothing is refused or dropped,
so a saturated daemon answers reads more slowly, in arrival order, and always some of them.
Calls that are not reads never wait here. A turn then holds a few reads plus the requests
that arrive meanwhile (about as many: a keep-alive client sends its next request once its
answer is out), so each await of a lifecycle call costs at most a few reads' time.

Mutating calls do their disk I/O in worker threads, which need the GIL back after each system
call; while the loop thread is busy with reads, a waiting thread gets it only when the loop
thread is forced to switch, every ``sys.getswitchinterval()`` (5 ms by default). A create that
makes ~20 system calls then waits ~100 ms for the GIL alone (the "convoy effect").
``SWITCH_INTERVAL`` (set by the daemon at start, ``favour_worker_threads``) shortens that wait;
with no thread waiting, the interval costs nothing.

A turn is detected without touching the loop's internals: the first read admitted in a turn
schedules ``_next_turn`` with ``call_soon``, which asyncio runs at the next turn; it resets
the count and lets queued reads in. Below ``per_turn`` reads a turn (any light load), the gate
costs a counter and one callback per turn, and a read never waits.
"""

from __future__ import annotations

import asyncio
import sys
from collections import deque
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")

# Seconds the loop thread runs before a worker thread waiting for the GIL gets it.
SWITCH_INTERVAL = 0.0005


def favour_worker_threads() -> None:
    """Hand the GIL to waiting worker threads sooner (see the module's docstring)."""
    sys.setswitchinterval(SWITCH_INTERVAL)


class ReadGate:
    """Admit a few reads per event-loop turn, fewer while writes run; the rest wait, in order."""

    def __init__(self, reads: frozenset[str], per_turn: int = 16,
                 per_turn_writing: int = 2) -> None:
        if min(per_turn, per_turn_writing) < 1:
            raise ValueError("per_turn and per_turn_writing must be at least 1")
        self.reads = reads
        self.per_turn = per_turn
        self.per_turn_writing = per_turn_writing
        self.writing = 0  # calls in flight that are not reads
        self._used = 0
        self._scheduled = False
        self._queue: deque[asyncio.Future[None]] = deque()

    def is_read(self, method: str) -> bool:
        return method in self.reads

    @property
    def share(self) -> int:
        """Reads that may start in the current turn."""
        return self.per_turn_writing if self.writing else self.per_turn

    async def run(self, method: str, call: Awaitable[T]) -> T:
        """Await ``call`` (the handler of ``method``): after its turn if a read, else at once."""
        if method not in self.reads:
            self.writing += 1
            try:
                return await call
            finally:
                self.writing -= 1
        try:
            await self.admit()
        except BaseException:
            if asyncio.iscoroutine(call):
                call.close()  # never started: no "never awaited" warning
            raise
        return await call

    def admit_now(self, method: str) -> bool:
        """Admit a read of ``method`` at once if this turn has room; False for any other call.

        The fast path of :meth:`run` for callers that await the handler themselves: on False
        they go through ``run``, which queues a read or counts a write.
        """
        if method in self.reads and self._used < self.share and not self._queue:
            self._used += 1
            self._schedule()
            return True
        return False

    async def admit(self) -> None:
        """Return when this read may run: at once, unless the turn's share is used up."""
        if self._used < self.share and not self._queue:
            self._used += 1
            self._schedule()
            return
        waiter = asyncio.get_running_loop().create_future()
        self._queue.append(waiter)
        self._schedule()
        # A cancelled read (its client left) cancels the waiter, which ``_next_turn`` skips.
        await waiter

    @property
    def waiting(self) -> int:
        return len(self._queue)

    def _schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._next_turn)

    def _next_turn(self) -> None:
        self._scheduled = False
        self._used = 0
        while self._queue and self._used < self.share:
            waiter = self._queue.popleft()
            if not waiter.done():
                waiter.set_result(None)
                self._used += 1
        if self._used:
            # The reads let in run in the next turn; count them against it, then go on.
            self._schedule()
