"""The daemon's client: errors it raises and ensure_supervisor's start-or-connect."""

from __future__ import annotations

import socket

import pytest

from tests.support.supervisor_proc import (
    SupervisorPaths,
    alive,
    answers,
    kill_recorded_children,
    kill_supervisor_by_pid_file,
    running_supervisor,
)
from vmm.exceptions import InvalidField, SupervisorError
from vmm.supervisor.client import SupervisorClient, ensure_supervisor

pytestmark = pytest.mark.anyio


async def test_unreachable_supervisor(paths: SupervisorPaths) -> None:
    """Without a supervisor, ping is False and calls raise SupervisorError naming the socket."""
    with socket.socket(socket.AF_UNIX) as stale:
        stale.bind(str(paths.sock))
    for path in (paths.sock, paths.root / "missing.sock"):
        async with SupervisorClient(path, timeout=2) as client:
            assert not await client.ping()
            with pytest.raises(SupervisorError, match=f"supervisor unreachable at {path}"):
                await client.list()


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
