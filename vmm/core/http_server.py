"""A uvicorn server that sleeps while idle.

uvicorn's main loop wakes every 0.1 s to refresh the Date header, whose resolution is a second,
and to notice a request to exit. An idle daemon and an idle supervisor each woke ten times a
second for that alone: CPU taken from the VMs on the host, and a halted vCPU woken each time.
``CalmServer`` ticks once a second instead. Asking it to exit (``ask_exit``, or a signal that
reaches ``handle_exit``) wakes it at once, so shutdown is not slower for the longer tick.
"""

from __future__ import annotations

import asyncio
import contextlib
from types import FrameType

import uvicorn

TICK = 1.0
# uvicorn's ``on_tick(counter)`` refreshes the Date header when the counter is a multiple of 10
# (once a second at its 0.1 s tick): counting in tens refreshes it at every tick of ours.
_DATE_EVERY = 10
_COUNTER_WRAP = 864_000


class CalmServer(uvicorn.Server):
    """``uvicorn.Server`` with a one-second tick that a request to exit cuts short."""

    tick = TICK

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._exit_asked: asyncio.Event | None = None

    async def main_loop(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._exit_asked = asyncio.Event()
        counter = 0
        try:
            while not await self.on_tick(counter):
                counter = (counter + _DATE_EVERY) % _COUNTER_WRAP
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.tick):
                        await self._exit_asked.wait()
        finally:
            self._exit_asked = None

    def ask_exit(self) -> None:
        """Stop serving now rather than at the next tick; safe from any thread."""
        self.should_exit = True
        self._wake()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        self._wake()

    def _wake(self) -> None:
        event, loop = self._exit_asked, self._loop
        if event is None or loop is None or loop.is_closed():
            return  # not serving (yet, or any more): ``should_exit`` is read when it starts
        # Thread-safe because a signal handler may run while the loop sleeps in the selector:
        # a plain ``set`` would schedule the wake-up without waking the selector.
        loop.call_soon_threadsafe(event.set)
