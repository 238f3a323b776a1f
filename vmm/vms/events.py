"""The daemon's one event bus: every change of a VM that someone may watch goes through here.

A VM's lifecycle steps (created, started, stopped, shut down and how, exited, removing,
removed), what its guest reports (boot progress, errors, shutdown progress) and auto-restart
decisions are all published with ``publish``. Each event gets a sequence number (the SSE id),
is kept in a bounded history (for ``Last-Event-ID`` resume) and is handed to every subscriber.
The per-VM ring that Status reports is filled by the same call (``Vm.add_event``), so the
stream and Status never disagree.

Subscribers get a bounded queue each. One that does not keep up is cut off (``lagged``) rather
than let the queue grow: its stream ends and the client resumes from its last id, out of the
history, like after any other disconnect.

Sequence numbers start from the wall clock (in milliseconds) and only grow, so an id a client
kept from the previous daemon is below every id of this one: it gets this daemon's history and
a ``reset`` mark saying that events may have been missed.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

DEFAULT_HISTORY = 1000
DEFAULT_QUEUE = 1000


@dataclass(frozen=True)
class Event:
    seq: int
    vm_id: str
    event: str
    body: str
    timestamp_ms: int
    status: str  # the VM's status when the event happened ("removed" once it is gone)

    def as_json(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "vm_id": self.vm_id,
            "event": self.event,
            "body": self.body,
            "timestamp": self.timestamp_ms,
            "status": self.status,
        }


@dataclass(eq=False)  # one per listener, kept in a set by identity
class Subscription:
    """One listener: events arrive in ``queue``; ``lagged`` once it fell too far behind."""

    vm_ids: frozenset[str]
    queue: asyncio.Queue[Event]
    lagged: bool = False
    # Set when the subscription ended by lagging, so a waiting reader wakes up at once.
    _wake: asyncio.Event = field(default_factory=asyncio.Event)

    def wants(self, event: Event) -> bool:
        return not self.vm_ids or event.vm_id in self.vm_ids

    async def next(self, timeout: float) -> Event | None:
        """The next event, or None after ``timeout`` seconds without one (or once lagged)."""
        if not self.queue.empty():
            return self.queue.get_nowait()
        if self.lagged:
            return None
        getter = asyncio.ensure_future(self.queue.get())
        waker = asyncio.ensure_future(self._wake.wait())
        try:
            done, _ = await asyncio.wait({getter, waker}, timeout=timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            getter.cancel()
            waker.cancel()
        if getter in done and not getter.cancelled():
            return getter.result()
        return None


@dataclass(frozen=True)
class Replay:
    events: list[Event]
    gap: bool  # events after the client's id are no longer in the history (or the id is unknown)


class EventBus:
    def __init__(
        self,
        history: int = DEFAULT_HISTORY,
        queue_size: int = DEFAULT_QUEUE,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._history: deque[Event] = deque(maxlen=history)
        self._subscribers: set[Subscription] = set()
        self._queue_size = queue_size
        self._clock = clock
        self._seq = int(clock() * 1000)

    @property
    def last_seq(self) -> int:
        return self._seq

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)

    def publish(self, vm_id: str, event: str, body: str = "", *, status: str = "",
                timestamp_ms: int | None = None) -> Event:
        self._seq += 1
        item = Event(
            seq=self._seq,
            vm_id=vm_id,
            event=event,
            body=body,
            timestamp_ms=int(self._clock() * 1000) if timestamp_ms is None else timestamp_ms,
            status=status,
        )
        self._history.append(item)
        for sub in self._subscribers:
            if sub.lagged or not sub.wants(item):
                continue
            try:
                sub.queue.put_nowait(item)
            except asyncio.QueueFull:
                sub.lagged = True
                sub._wake.set()
        return item

    def replay(self, after: int, vm_ids: Iterable[str] = ()) -> Replay:
        """The events after ``after`` still in the history (for one subscriber's filter)."""
        wanted = frozenset(vm_ids)
        oldest = self._history[0].seq if self._history else self._seq + 1
        gap = after > self._seq or after < oldest - 1
        events = [e for e in self._history if e.seq > after and (not wanted or e.vm_id in wanted)]
        return Replay(events=events, gap=gap)

    @contextmanager
    def subscribe(self, vm_ids: Iterable[str] = ()) -> Iterator[Subscription]:
        """Listen for events from now on until the ``with`` block ends (however it ends)."""
        sub = Subscription(vm_ids=frozenset(vm_ids), queue=asyncio.Queue(self._queue_size))
        self._subscribers.add(sub)
        try:
            yield sub
        finally:
            self._subscribers.discard(sub)
