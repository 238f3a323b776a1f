"""The watcher loop: a failing refresh or duty is logged and the round goes on."""

from __future__ import annotations

import asyncio

import pytest

from vmm.core.exceptions import Unavailable
from vmm.vms import watcher


def test_a_failing_refresh_or_duty_does_not_stop_the_others(caplog: pytest.LogCaptureFixture) -> None:
    """Refresh and the first duty raise every round; the second duty still runs each round."""
    ran: list[str] = []
    third_round = asyncio.Event()

    async def refresh() -> None:
        ran.append("refresh")
        raise Unavailable("supervisor restarting")

    async def broken() -> None:
        ran.append("broken")
        raise RuntimeError("bug in a duty")

    async def healthy() -> None:
        ran.append("healthy")
        if ran.count("healthy") == 3:
            third_round.set()

    async def three_rounds() -> None:
        task = asyncio.create_task(watcher.watch(refresh, (broken, healthy), interval=0))
        await third_round.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(asyncio.wait_for(three_rounds(), 10))
    assert ran[:6] == ["refresh", "broken", "healthy"] * 2
    assert "cannot refresh VM states: supervisor restarting" in caplog.text
    assert "watcher duty" in caplog.text and "bug in a duty" in caplog.text
