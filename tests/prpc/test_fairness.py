"""ReadGate: reads take turns on the event loop, in order, none dropped; other calls never wait."""

from __future__ import annotations

import asyncio

import pytest

from vmm.api.app import READ_METHODS
from vmm.prpc.fairness import ReadGate
from vmm.rpc import vmm_rpc_pb2


class Turns:
    """Counts event-loop turns: a callback that re-schedules itself runs once per turn."""

    def __init__(self) -> None:
        self.now = 0
        self.running = True

    def tick(self) -> None:
        self.now += 1
        if self.running:
            asyncio.get_running_loop().call_soon(self.tick)


def test_at_most_per_turn_reads_start_in_one_turn_in_arrival_order() -> None:
    """20 reads arriving at once start 3 per turn, first come first served, all of them."""
    async def scenario() -> list[tuple[int, int]]:
        gate = ReadGate(frozenset({"Status"}), per_turn=3)
        turns = Turns()
        asyncio.get_running_loop().call_soon(turns.tick)
        started: list[tuple[int, int]] = []

        async def read(n: int) -> None:
            await gate.admit()
            started.append((n, turns.now))

        await asyncio.gather(*(read(n) for n in range(20)))
        turns.running = False
        return started

    started = asyncio.run(scenario())
    assert [n for n, _ in started] == list(range(20))
    per_turn: dict[int, int] = {}
    for _, turn in started:
        per_turn[turn] = per_turn.get(turn, 0) + 1
    assert max(per_turn.values()) == 3
    assert len(per_turn) == 7  # ceil(20 / 3)


def test_reads_get_a_smaller_share_while_a_write_runs() -> None:
    """With a write in flight, 2 reads start per turn instead of 16; the write never waits."""
    async def scenario() -> tuple[dict[int, int], list[str]]:
        gate = ReadGate(frozenset({"Status"}), per_turn=16, per_turn_writing=2)
        turns = Turns()
        asyncio.get_running_loop().call_soon(turns.tick)
        release = asyncio.Event()
        order: list[str] = []
        per_turn: dict[int, int] = {}

        async def write() -> None:
            order.append("write started")
            await release.wait()

        async def read() -> None:
            per_turn[turns.now] = per_turn.get(turns.now, 0) + 1

        writer = asyncio.create_task(gate.run("CreateVm", write()))
        await asyncio.sleep(0)
        assert gate.writing == 1
        await asyncio.gather(*(gate.run("Status", read()) for _ in range(10)))
        release.set()
        await writer
        turns.running = False
        assert gate.writing == 0
        return per_turn, order

    per_turn, order = asyncio.run(scenario())
    assert order == ["write started"]
    assert max(per_turn.values()) == 2 and sum(per_turn.values()) == 10


def test_a_cancelled_waiting_read_does_not_stall_the_queue() -> None:
    """A read whose client left while it waited is skipped; those behind it still start."""
    async def scenario() -> list[int]:
        gate = ReadGate(frozenset({"Status"}), per_turn=1)
        started: list[int] = []

        async def read(n: int) -> None:
            await gate.admit()
            started.append(n)

        tasks = [asyncio.create_task(read(n)) for n in range(4)]
        await asyncio.sleep(0)  # all four reached the gate: 0 is in, 1..3 wait
        tasks[1].cancel()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 5)
        return started

    assert asyncio.run(scenario()) == [0, 2, 3]
    assert ReadGate(frozenset(), per_turn=1).waiting == 0


def test_the_gate_idles_without_reads() -> None:
    """Reads under the share start at once, without waiting for a turn."""
    async def scenario() -> int:
        gate = ReadGate(frozenset({"Version"}), per_turn=4)
        for _ in range(4):
            await gate.admit()  # would hang the test if it waited for a turn: nothing else runs
        return gate.waiting

    assert asyncio.run(scenario()) == 0
    with pytest.raises(ValueError, match="per_turn"):
        ReadGate(frozenset(), per_turn=0)


def test_read_methods_are_methods_of_the_service() -> None:
    """Every name the daemon's gate treats as a read is a real Vmm method (no typo slips by)."""
    names = {m.name for m in vmm_rpc_pb2.DESCRIPTOR.services_by_name["Vmm"].methods}
    assert names >= READ_METHODS
    assert not READ_METHODS & {"CreateVm", "UpdateVm", "RemoveVm", "StartVm", "StopVm"}


def test_admit_now_counts_against_the_turn_share_and_never_admits_writes() -> None:
    """admit_now lets reads in while the turn has room, counting them; a write is never let in."""
    async def scenario() -> list[bool]:
        gate = ReadGate(frozenset({"Status"}), per_turn=2)
        seen = [gate.admit_now("Status"), gate.admit_now("Status"), gate.admit_now("Status")]
        seen.append(gate.admit_now("CreateVm"))  # a write: run() counts it instead
        assert gate.writing == 0
        await asyncio.sleep(0)  # the next turn has room again
        seen.append(gate.admit_now("Status"))
        return seen

    assert asyncio.run(scenario()) == [True, True, False, False, True]
