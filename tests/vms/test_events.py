"""The event bus: numbering, history, filters, slow subscribers and subscription lifetime."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.guest.test_host_api import Guest, state, with_link
from vmm.core.config import AutoRestartConfig, KeyProviderConfig
from vmm.core.exceptions import Conflict
from vmm.model.vm import Vm
from vmm.vms.auto_restart import AutoRestart
from vmm.vms.events import EventBus
from vmm.vms.manager import Manager

__all__ = ["state"]  # the fixture, shared with the host API tests


def test_ids_grow_from_the_clock_and_keep_publication_order() -> None:
    """Each event gets the next id, starting past the clock (ms) so a new daemon's ids are higher."""
    bus = EventBus(clock=lambda: 1000.0)
    first = bus.publish("a", "vmm.created")
    second = bus.publish("a", "vmm.started", status="running")
    assert (first.seq, second.seq) == (1_000_001, 1_000_002)
    assert second.as_json() == {"seq": 1_000_002, "vm_id": "a", "event": "vmm.started",
                                "body": "", "timestamp": 1_000_000, "status": "running"}


def test_replay_gives_the_events_after_an_id_filtered_by_vm() -> None:
    """Replay returns what followed the client's id, only for the VMs it asked about."""
    bus = EventBus(clock=lambda: 0.0)
    events = [bus.publish(vm, f"e{i}") for i, vm in enumerate("abab")]
    replay = bus.replay(events[0].seq, ["b"])
    assert [e.event for e in replay.events] == ["e1", "e3"]
    assert not replay.gap


def test_replay_says_when_events_fell_out_of_the_bounded_history() -> None:
    """An id older than the history (or from the future) is a gap; the history stays bounded."""
    bus = EventBus(history=3, clock=lambda: 0.0)
    events = [bus.publish("a", f"e{i}") for i in range(5)]
    assert [e.event for e in bus.replay(0).events] == ["e2", "e3", "e4"]
    assert bus.replay(0).gap
    assert not bus.replay(events[1].seq).gap  # e2 is the next one and still there
    assert bus.replay(events[4].seq + 10).gap


def test_subscribers_get_live_events_and_are_dropped_when_done() -> None:
    """A subscription receives matching events in order and leaves the bus when its block ends."""

    async def scenario() -> None:
        bus = EventBus()
        with bus.subscribe(["a"]) as sub:
            assert bus.subscriber_count == 1
            bus.publish("b", "other")
            bus.publish("a", "one")
            bus.publish("a", "two")
            got = [await sub.next(1.0), await sub.next(1.0)]
            assert [e.event for e in got if e] == ["one", "two"]
            assert await sub.next(0.01) is None  # nothing more: times out
        assert bus.subscriber_count == 0

    asyncio.run(scenario())


def test_a_subscriber_that_falls_behind_is_cut_off_not_buffered_without_bound() -> None:
    """Past its queue size a subscriber is marked lagged and gets nothing more."""

    async def scenario() -> None:
        bus = EventBus(queue_size=2)
        with bus.subscribe() as sub:
            for i in range(5):
                bus.publish("a", f"e{i}")
            assert sub.lagged
            assert sub.queue.qsize() == 2
            assert [(await sub.next(1.0)) is not None for _ in range(3)] == [True, True, False]

    asyncio.run(scenario())


def test_guest_notifications_and_auto_restart_decisions_reach_the_bus(state: Path) -> None:
    """The hub's Notify effects and auto-restart's decisions are published with the status they led to."""

    async def scenario(guest: Guest, vm: Vm, manager: Manager) -> None:
        with manager.events.subscribe([vm.id]) as sub:
            await manager.set_desired(vm, started=True)
            await guest.call("Notify", {"event": "boot.progress", "payload": "starting containers"})
            await guest.call("Notify", {"event": "shutdown.progress", "payload": "powering off"})
            await manager.set_desired(vm, started=True)

            async def refuse(vm_id: str) -> None:
                raise Conflict("no room")

            restarts = AutoRestart(AutoRestartConfig(enabled=True, max_retries=1),
                                   vms=lambda: [vm], start=refuse)
            await restarts.check(0.0)  # first seen down: scheduled
            await restarts.check(1e6)  # due: one attempt, refused
            await restarts.check(2e6)  # due again: out of attempts
            got = []
            while (event := await sub.next(0.01)) is not None:
                got.append((event.event, event.body, event.status))
        assert got == [
            ("boot.progress", "starting containers", "exited"),
            # The guest powering off cleared the desired state before the event went out.
            ("shutdown.progress", "powering off", "stopped"),
            ("vmm.auto_restart", "attempt 1 of 1 failed: no room", "exited"),
            ("vmm.auto_restart.exhausted", "Automatic restart stopped after 1 failed attempts",
             "exited"),
        ]
        assert [e.event for e in vm.events][-4:] == [g[0] for g in got]  # the ring agrees

    asyncio.run(with_link(state, KeyProviderConfig(enabled=False), scenario))
