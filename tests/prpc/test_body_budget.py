"""The process-wide budget for request bodies: unit behaviour and the real daemon's 503."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import pytest

from tests.support import short_dirs
from tests.support.daemon_proc import DaemonProcess, running_daemon
from vmm.core.exceptions import PayloadTooLarge, Unavailable
from vmm.prpc.body_budget import BodyBudget

T = TypeVar("T")
MIB = 1024 * 1024


def run(coro: Coroutine[Any, Any, T]) -> T:
    async def bounded() -> T:
        async with asyncio.timeout(30):
            return await coro

    return asyncio.run(bounded())


def test_a_claim_is_returned_whole_when_the_request_is_done() -> None:
    """Bytes covered step by step are all given back when the claim ends, even on error."""

    async def scenario() -> None:
        budget = BodyBudget(100, wait=0)
        async with budget.claim() as claim:
            await claim.cover(30)
            await claim.cover(70)
            await claim.cover(50)  # already covered: takes nothing more
            assert budget.in_use == 70
        assert budget.in_use == 0
        with pytest.raises(RuntimeError):
            async with budget.claim() as claim:
                await claim.cover(100)
                raise RuntimeError("handler failed")
        assert budget.in_use == 0

    run(scenario())


def test_a_claim_that_does_not_fit_waits_then_is_refused_with_503() -> None:
    """Past the budget, a claim waits ``wait`` seconds and then fails as Unavailable (503)."""

    async def scenario() -> None:
        budget = BodyBudget(100, wait=0.1)
        async with budget.claim() as first:
            await first.cover(80)
            async with budget.claim() as second:
                with pytest.raises(Unavailable, match=r"server\.body_memory") as info:
                    await second.cover(30)
                assert info.value.status_code == 503
                assert budget.in_use == 80

    run(scenario())


def test_a_waiting_claim_proceeds_when_another_is_returned() -> None:
    """A claim blocked on the budget gets its bytes as soon as another request finishes."""

    async def scenario() -> None:
        budget = BodyBudget(100, wait=30)
        holder = budget.claim()
        held = await holder.__aenter__()
        await held.cover(90)

        async def second() -> int:
            async with budget.claim() as claim:
                await claim.cover(50)
                return budget.in_use

        waiter = asyncio.create_task(second())
        await asyncio.sleep(0)
        assert not waiter.done()
        await holder.__aexit__(None, None, None)
        assert await waiter == 50
        assert budget.in_use == 0

    run(scenario())


def test_a_body_larger_than_the_whole_budget_is_413() -> None:
    """A claim that could never fit is refused at once as too large, not left to wait."""

    async def scenario() -> None:
        budget = BodyBudget(100, wait=30)
        async with budget.claim() as claim:
            with pytest.raises(PayloadTooLarge):
                await claim.cover(101)

    run(scenario())


# --- through the real daemon -----------------------------------------------------------------


@pytest.fixture
def daemon() -> Iterator[DaemonProcess]:
    """A daemon whose body budget holds exactly two 1 MiB bodies."""
    with short_dirs.short_dir("vmmbud") as workdir, running_daemon(
        workdir,
        extra_config='max_request_body = "1M"\n[server]\nbody_memory = "2M"\n'
                     "body_memory_wait = 1.0\nbody_timeout = 120.0\n",
    ) as proc:
        yield proc


def json_body(size: int) -> bytes:
    """A valid JSON ``{}`` (Version takes no fields) padded to ``size`` bytes."""
    return b"{}" + b" " * (size - 2)


def hold_a_body(daemon: DaemonProcess, size: int) -> socket.socket:
    """A request that declares ``size`` body bytes and sends only the first."""
    host, port = daemon.base_url.removeprefix("http://").rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.sendall(
        b"POST /prpc/Version?json HTTP/1.1\r\nHost: vmm\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {size}\r\n\r\n{{".encode()
    )
    return sock


def test_bodies_past_the_budget_get_503_and_the_budget_frees_up(daemon: DaemonProcess) -> None:
    """With the budget held by unfinished bodies, another body gets a 503; freed, it is served."""
    holders = [hold_a_body(daemon, MIB), hold_a_body(daemon, MIB)]
    try:
        with daemon.client() as client:
            # The holders' heads were sent first: once this answer is back they are being read.
            assert client.get("/prpc/Version").status_code == 200
            refused = client.post("/prpc/Version?json", content=json_body(MIB // 2),
                                  headers={"Content-Type": "application/json"})
            assert refused.status_code == 503, refused.text
            assert "server.body_memory" in refused.json()["error"]
            assert refused.headers["x-content-type-options"] == "nosniff"
            too_large = client.post("/prpc/Version?json", content=json_body(MIB + 1),
                                    headers={"Content-Type": "application/json"})
            assert too_large.status_code == 413
            holders.pop().close()
            # The daemon must first notice the close; each try waits up to body_memory_wait.
            for _ in range(10):
                served = client.post("/prpc/Version?json", content=json_body(MIB // 2),
                                     headers={"Content-Type": "application/json"})
                if served.status_code != 503:
                    break
            assert served.status_code == 200, served.text
    finally:
        for sock in holders:
            sock.close()
    assert "Traceback" not in daemon.log()


def test_a_small_body_fits_beside_one_held_body(daemon: DaemonProcess) -> None:
    """The budget counts bytes, not requests: one held body leaves room for others."""
    holder = hold_a_body(daemon, MIB)
    try:
        with daemon.client() as client:
            for _ in range(3):
                answer = client.post("/prpc/Version?json", content=json_body(MIB // 2),
                                     headers={"Content-Type": "application/json"})
                assert answer.status_code == 200, answer.text
    finally:
        holder.close()


def test_cover_now_takes_what_fits_and_leaves_the_rest_to_cover() -> None:
    """cover_now holds bytes that fit at once; past the capacity it takes nothing and says so."""

    async def scenario() -> None:
        budget = BodyBudget(100, wait=0)
        claim = budget.claim()
        assert claim.cover_now(60) and budget.in_use == 60
        assert claim.cover_now(40) and budget.in_use == 60  # already held
        other = budget.claim()
        assert not other.cover_now(50)
        assert (other.held, budget.in_use) == (0, 60)
        with pytest.raises(Unavailable):
            await other.cover(50)  # what a caller does next: wait (here 0 s), then 503
        claim.release()
        assert other.cover_now(50) and budget.in_use == 50
        other.release()
        assert budget.in_use == 0

    run(scenario())
