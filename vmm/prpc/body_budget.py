"""One process-wide bound on the memory request bodies hold while they are read and handled.

``max_request_body`` bounds one body; without a bound on their sum, forty concurrent 10 MB
bodies held 445 MB. A request claims budget as its body arrives (all of a declared
Content-Length at once, so it never stalls half-read) and gives it back when its handler is
done. A claim that cannot be met waits up to ``wait`` seconds for others to finish, then fails
with a 503 naming the setting.
"""

from __future__ import annotations

import asyncio
import contextlib

from vmm.core.exceptions import PayloadTooLarge, Unavailable

SETTING = "server.body_memory"


class BodyBudget:
    def __init__(self, capacity: int, wait: float) -> None:
        self.capacity = capacity
        self.wait = wait
        self.in_use = 0
        self._waiters: list[asyncio.Future[None]] = []

    def claim(self) -> BodyClaim:
        """A claim that grows with :meth:`BodyClaim.cover` and is returned whole on exit.

        Used as ``async with budget.claim() as claim``: a plain class, not a generator-based
        context manager, since every request takes one.
        """
        return BodyClaim(self)

    def take_now(self, size: int) -> bool:
        """Take ``size`` bytes if they fit now; False if taking them means waiting or refusing."""
        if self.in_use + size > self.capacity:
            return False
        self.in_use += size
        return True

    async def acquire(self, size: int) -> None:
        if size > self.capacity:
            raise PayloadTooLarge(f"payload too large: {size} bytes ({SETTING} {self.capacity})")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait
        while self.in_use + size > self.capacity:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise Unavailable(
                    f"server busy: request bodies in flight hold {self.in_use} of "
                    f"{self.capacity} bytes ({SETTING}); retry shortly"
                )
            waiter = loop.create_future()
            self._waiters.append(waiter)
            try:
                # A timeout is not final: the loop re-checks and refuses only past the deadline.
                await asyncio.wait_for(waiter, remaining)
            except TimeoutError:
                pass
            finally:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
        self.in_use += size

    def release(self, size: int) -> None:
        if size <= 0:
            return
        self.in_use -= size
        # Wake everyone: each re-checks whether its own size now fits.
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)


class BodyClaim:
    """The budget one request holds."""

    def __init__(self, budget: BodyBudget) -> None:
        self._budget = budget
        self.held = 0

    async def __aenter__(self) -> BodyClaim:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release()

    def release(self) -> None:
        """Give back all the claim holds (what ``async with`` does on exit)."""
        if self.held:
            self._budget.release(self.held)
            self.held = 0

    def cover_now(self, size: int) -> bool:
        """:meth:`cover` without waiting: False if that would wait (or refuse); then call it."""
        if size > self.held:
            if not self._budget.take_now(size - self.held):
                return False
            self.held = size
        return True

    async def cover(self, size: int) -> None:
        """Hold at least ``size`` bytes, waiting for the difference if need be."""
        if size > self.held:
            await self._budget.acquire(size - self.held)
            self.held = size
