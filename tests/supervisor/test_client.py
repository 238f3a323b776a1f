"""The daemon's client: errors it raises, ensure_supervisor's start-or-connect, and restarts."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.support.supervisor_proc import (
    SupervisorPaths,
    alive,
    answers,
    kill_recorded_children,
    kill_supervisor_by_pid_file,
    running_supervisor,
    sh_config,
    start_ticks,
)
from vmm.core.exceptions import InvalidField, SupervisorError, SupervisorUnavailable
from vmm.supervisor.client import (
    RESTART_BACKOFF,
    SupervisorClient,
    SupervisorLaunch,
    ensure_supervisor,
)

pytestmark = pytest.mark.anyio


async def test_unreachable_supervisor(paths: SupervisorPaths) -> None:
    """Without a supervisor, ping is False and calls raise a 503 naming the socket."""
    with socket.socket(socket.AF_UNIX) as stale:
        stale.bind(str(paths.sock))
    for path in (paths.sock, paths.root / "missing.sock"):
        async with SupervisorClient(path, timeout=2) as client:
            assert not await client.ping()
            with pytest.raises(SupervisorError, match=f"supervisor unreachable at {path}") as e:
                await client.list()
            assert isinstance(e.value, SupervisorUnavailable)
            assert e.value.status_code == 503


async def test_refusal_carries_the_supervisor_message(paths: SupervisorPaths) -> None:
    """A refused call raises SupervisorError with the supervisor's own error text."""
    with running_supervisor(paths):
        async with SupervisorClient(paths.sock) as client:
            with pytest.raises(SupervisorError) as caught:
                await client.stop("ghost")
            assert caught.value.message == "process not found: 'ghost'"


async def test_ensure_supervisor_starts_one_then_reuses_it(paths: SupervisorPaths) -> None:
    """ensure_supervisor starts a supervisor when none answers and reuses a live one after."""
    try:
        client = await ensure_supervisor(
            paths.sock, paths.pid_file, paths.log_file, state_file=paths.state_file
        )
        async with client:
            assert await client.ping()
            pid = int(paths.pid_file.read_text())
            assert alive(pid)
        again = await ensure_supervisor(
            paths.sock, paths.pid_file, paths.log_file, state_file=paths.state_file
        )
        async with again:
            assert await again.list() == []
        assert int(paths.pid_file.read_text()) == pid
    finally:
        kill_supervisor_by_pid_file(paths)
        kill_recorded_children(paths)


async def test_ensure_supervisor_reports_a_failed_start(paths: SupervisorPaths) -> None:
    """A supervisor that exits at start makes ensure_supervisor fail with the log's tail."""
    paths.sock.write_text("not a socket")
    with pytest.raises(SupervisorError, match=r"exited with code 2(.|\n)*not a socket"):
        await ensure_supervisor(paths.sock, paths.pid_file, paths.log_file, start_timeout=20)
    assert not answers(paths.sock)


async def test_client_refuses_ids_that_are_not_names(paths: SupervisorPaths) -> None:
    """The client never turns '..' or a newline into a URL: InvalidField before any request."""
    async with SupervisorClient(paths.root / "none.sock", timeout=2) as client:
        for call in (client.start, client.stop, client.remove, client.info):
            for bad in ("..", ".", "a/b", "a\nb"):
                with pytest.raises(InvalidField, match="`id`"):
                    await call(bad)


def launch_of(paths: SupervisorPaths) -> SupervisorLaunch:
    return SupervisorLaunch(paths.sock, paths.pid_file, paths.log_file, paths.state_file)


@contextlib.asynccontextmanager
async def restarting_client(paths: SupervisorPaths) -> AsyncIterator[SupervisorClient]:
    """A client that restarts its supervisor; every supervisor and child is killed at the end."""
    try:
        client = await ensure_supervisor(
            paths.sock, paths.pid_file, paths.log_file, state_file=paths.state_file, restart=True
        )
        async with client:
            yield client
    finally:
        kill_supervisor_by_pid_file(paths)
        kill_recorded_children(paths)


def supervisor_starts(paths: SupervisorPaths) -> int:
    """How many supervisors have started serving on this log's socket so far."""
    return paths.log_text().count(" serving on ")


async def test_restarting_client_brings_a_killed_supervisor_back(paths: SupervisorPaths) -> None:
    """After kill -9 the next call starts a new supervisor, which re-adopts the running child."""
    async with restarting_client(paths) as client:
        await client.deploy(sh_config(paths, "vm", "exec sleep 1000"))
        info = await client.info("vm")
        assert info is not None and info.state.pid is not None
        child, ticks = info.state.pid, start_ticks(info.state.pid)
        old = int(paths.pid_file.read_text())
        kill_supervisor_by_pid_file(paths)

        adopted = await client.info("vm")
        assert adopted is not None
        assert (adopted.state.status, adopted.state.pid) == ("running", child)
        assert start_ticks(child) == ticks
        new = int(paths.pid_file.read_text())
        assert new != old and alive(new)
        await client.stop("vm")  # a write after the restart reaches the new supervisor
        assert not alive(child)


async def test_concurrent_callers_share_one_restart(paths: SupervisorPaths) -> None:
    """Calls that all find the supervisor dead wait for one restart, then all succeed."""
    async with restarting_client(paths) as client:
        kill_supervisor_by_pid_file(paths)
        results = await asyncio.gather(*(client.list() for _ in range(8)))
        assert results == [[]] * 8
        # One launch: a second would have lost the socket's lock and said so in the log.
        assert supervisor_starts(paths) == 2, paths.log_text()
        assert "not starting" not in paths.log_text()


async def test_failed_restart_is_unavailable_and_backs_off(paths: SupervisorPaths) -> None:
    """A restart that fails is a 503 with the cause; the next waits out a backoff, then works."""
    async with restarting_client(paths) as client:
        await client.clear()  # the state file now exists
        table = paths.state_file.read_bytes()
        paths.state_file.write_text("{not json")  # a supervisor refuses to start on this
        kill_supervisor_by_pid_file(paths)

        with pytest.raises(SupervisorUnavailable, match="cannot read state file") as failed:
            await client.list()
        assert failed.value.status_code == 503
        refusals = paths.log_text().count("not starting")
        with pytest.raises(SupervisorUnavailable, match="next attempt in"):
            await client.list()
        assert paths.log_text().count("not starting") == refusals  # no second launch yet

        paths.state_file.write_bytes(table)
        await asyncio.sleep(RESTART_BACKOFF)
        assert await client.list() == []


@contextlib.contextmanager
def dies_mid_request(sock: Path) -> Iterator[threading.Thread]:
    """A stand-in supervisor that takes one request and vanishes before it answers.

    The listener is gone before the connection drops, as when a supervisor is killed while it
    handles a call, so the client's restart finds the socket dead and starts a real one.
    """
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(sock))
    listener.listen(1)
    listener.settimeout(10)

    def serve() -> None:
        try:
            conn, _ = listener.accept()
        finally:
            listener.close()
            sock.unlink()
        with conn:
            conn.recv(65536)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield thread
    finally:
        thread.join(timeout=15)


@pytest.mark.parametrize(("method", "resent"), [("clear", False), ("list", True)])
async def test_call_cut_off_mid_request(paths: SupervisorPaths, method: str, resent: bool) -> None:
    """A supervisor dying during a call: a read is sent again, a write is a 503, not resent."""
    try:
        async with SupervisorClient(paths.sock, launch=launch_of(paths)) as client:
            with dies_mid_request(paths.sock):
                call = getattr(client, method)
                if resent:
                    assert await call() == []
                else:
                    with pytest.raises(SupervisorUnavailable, match="retry it"):
                        await call()
            assert answers(paths.sock)  # restarted either way
    finally:
        kill_supervisor_by_pid_file(paths)


async def test_out_of_descriptors_is_unavailable_and_starts_no_second_supervisor(
    paths: SupervisorPaths,
) -> None:
    """With this process out of fds, a call is a 503 saying so; the live supervisor is kept."""
    async with restarting_client(paths) as client:
        await client.clear()
        supervisor_pid = int(paths.pid_file.read_text())
        fresh = SupervisorClient(paths.sock, launch=launch_of(paths))  # no pooled connection
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        fillers: list[int] = []
        try:
            in_use = len(list(Path("/proc/self/fd").iterdir()))  # noqa: ASYNC240
            resource.setrlimit(resource.RLIMIT_NOFILE, (in_use + 16, hard))
            with contextlib.suppress(OSError):
                while True:
                    fillers.append(os.open("/dev/null", os.O_RDONLY))
            with pytest.raises(SupervisorUnavailable, match="out of file descriptors") as caught:
                await fresh.list()
            assert caught.value.status_code == 503
        finally:
            for fd in fillers:
                os.close(fd)
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            await fresh.aclose()
        assert int(paths.pid_file.read_text()) == supervisor_pid
        assert supervisor_starts(paths) == 1, paths.log_text()
        assert await client.list() == []
