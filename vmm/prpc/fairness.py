"""Fair share of the event loop for mutating calls under any read load.

The daemon serves every request on one event loop. asyncio runs, in each turn of the loop,
every callback that was ready when the turn began: with 200 clients reading, a turn runs up to
200 reads, and a lifecycle call (CreateVm, UpdateVm, ...) that awaits N times (a lock, a worker
thread, a backend call) waits N whole turns: seconds, behind reads that arrived after it.

``ReadGate`` bounds the reads that may *start* in one turn to ``per_turn``. A read beyond it
waits in a FIFO queue and is let in at a later turn, up to ``per_turn`` again; nothing is
refused or dropped, so a saturated daemon answers reads more slowly, in arrival order. Calls
that are not reads never wait here. A turn then holds at most ``per_turn`` reads plus the
requests that arrive meanwhile (about as many: a keep-alive client sends its next request once
its answer is out), so each await of a lifecycle call costs at most a few reads' time.

A turn is detected without touching the loop's internals: the first read admitted in a turn
schedules ``_next_turn`` with ``call_soon``, which asyncio runs at the next turn; it resets
the count and lets queued reads in. Below ``per_turn`` reads a turn (any light load), the gate
costs a counter and one callback per turn, and a read never waits.
"""

from __future__ import annotations

import asyncio
from collections import deque


class ReadGate:
    """Admit at most ``per_turn`` reads per event-loop turn; the rest wait, in order."""

    def __init__(self, reads: frozenset[str], per_turn: int = 8) -> None:
        if per_turn < 1:
            raise ValueError("per_turn must be at least 1")
        self.reads = reads
        self.per_turn = per_turn
        self._used = 0
        self._scheduled = False
        self._queue: deque[asyncio.Future[None]] = deque()

    def is_read(self, method: str) -> bool:
        return method in self.reads

    async def admit(self) -> None:
        """Return when this read may run: at once, unless the turn's share is used up."""
        if self._used < self.per_turn and not self._queue:
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
        while self._queue and self._used < self.per_turn:
            waiter = self._queue.popleft()
            if not waiter.done():
                waiter.set_result(None)
                self._used += 1
        if self._used:
            # The reads let in run in the next turn; count them against it, then go on.
            self._schedule()
