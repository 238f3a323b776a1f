"""VMs outlive the daemon and the supervisor: kills, restarts, re-adoption and shutdown."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import textwrap

import pytest

from tests.support.supervisor_proc import (
    SupervisorPaths,
    alive,
    answers,
    child_env,
    kill_if_same,
    kill_pid,
    kill_recorded_children,
    kill_supervisor_by_pid_file,
    release_fifo,
    running_supervisor,
    sh_config,
    spawn_supervisor,
    start_ticks,
    wait_answers,
    wait_file_contains,
    wait_gone,
    wait_status,
)
from vmm.supervisor.client import SupervisorClient

pytestmark = pytest.mark.anyio


LAUNCHER = textwrap.dedent(
    """
    import asyncio, json, sys
    from pathlib import Path
    from vmm.supervisor.client import ensure_supervisor
    from vmm.supervisor.types import ProcessConfig

    async def main() -> None:
        sock, pid_file, log_file, state_file, config = sys.argv[1:]
        client = await ensure_supervisor(
            Path(sock), Path(pid_file), Path(log_file), state_file=Path(state_file)
        )
        await client.deploy(ProcessConfig.from_json(json.loads(config)))
        info = await client.info("vm")
        print(info.state.pid, flush=True)
        await asyncio.sleep(3600)

    asyncio.run(main())
    """
)


def start_launcher(argv: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(argv, stdout=subprocess.PIPE, env=child_env())


def read_line(proc: subprocess.Popen[bytes], timeout: float) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, "the launcher printed nothing in time"
    return proc.stdout.readline().decode().strip()


async def test_supervisor_survives_sigkill_of_its_launcher(paths: SupervisorPaths) -> None:
    """A supervisor started by ensure_supervisor, and its child, outlive a SIGKILLed launcher."""
    config = sh_config(paths, "vm", "exec sleep 1000")
    argv = [sys.executable, "-c", LAUNCHER, str(paths.sock), str(paths.pid_file)]
    argv += [str(paths.log_file), str(paths.state_file), json.dumps(config.to_json())]
    launcher = start_launcher(argv)
    try:
        child_pid = int(read_line(launcher, 20))
        supervisor_pid = int(paths.pid_file.read_text())
        assert os.getsid(supervisor_pid) == supervisor_pid  # its own session
        launcher.kill()
        launcher.wait(timeout=10)
        assert answers(paths.sock)
        assert alive(supervisor_pid)
        assert alive(child_pid)
        async with SupervisorClient(paths.sock) as client:
            info = await client.info("vm")
            assert info is not None
            assert (info.state.status, info.state.pid) == ("running", child_pid)
    finally:
        kill_pid(launcher.pid)
        launcher.wait(timeout=10)
        assert launcher.stdout is not None
        launcher.stdout.close()
        kill_supervisor_by_pid_file(paths)
        kill_recorded_children(paths)


async def test_restarted_supervisor_readopts_children(paths: SupervisorPaths) -> None:
    """After the supervisor is SIGKILLed its children run on; the next one re-adopts them."""
    fifo = paths.root / "go"
    os.mkfifo(fifo)
    tracked: dict[str, tuple[int, int]] = {}
    try:
        with running_supervisor(paths, keep_children=True) as first:
            async with SupervisorClient(paths.sock) as client:
                await client.deploy(sh_config(paths, "keep", "exec sleep 1000"))
                await client.deploy(sh_config(paths, "ends", f"read x < {fifo}; exit 4"))
                await client.deploy(sh_config(paths, "dies", "exec sleep 1000"))
                for id in ("keep", "ends", "dies"):
                    info = await client.info(id)
                    assert info is not None and info.state.pid is not None
                    tracked[id] = (info.state.pid, start_ticks(info.state.pid))
            first.kill()
            first.wait(timeout=10)
        assert alive(tracked["keep"][0])
        assert alive(tracked["ends"][0])
        # One ends while no supervisor watches it.
        kill_pid(tracked["dies"][0])
        assert wait_gone(tracked["dies"][0], 5)

        with running_supervisor(paths):
            async with SupervisorClient(paths.sock) as client:
                keep = await client.info("keep")
                assert keep is not None
                assert (keep.state.status, keep.state.pid) == ("running", tracked["keep"][0])
                dies = await client.info("dies")
                assert dies is not None
                assert (dies.state.status, dies.state.exit_code) == ("exited", None)

                release_fifo(fifo)
                ends = await wait_status(client, "ends", "exited")
                assert ends.state.exit_code is None  # not our child: its status is not ours
                assert ends.state.stopped_at is not None

                await client.stop("keep")
                keep = await client.info("keep")
                assert keep is not None
                assert keep.state.status == "stopped"
                assert wait_gone(tracked["keep"][0], 0)
                await client.start("keep")
                restarted = await client.info("keep")
                assert restarted is not None and restarted.state.status == "running"
    finally:
        for pid, ticks in tracked.values():
            kill_if_same(pid, ticks)


async def test_reused_pid_is_never_adopted_or_signalled(paths: SupervisorPaths) -> None:
    """An entry whose pid now names a different process (start time differs) is left alone."""
    tracked: tuple[int, int] | None = None
    try:
        with running_supervisor(paths, keep_children=True) as first:
            async with SupervisorClient(paths.sock) as client:
                await client.deploy(sh_config(paths, "vm", "exec sleep 1000"))
                info = await client.info("vm")
                assert info is not None and info.state.pid is not None
                tracked = (info.state.pid, start_ticks(info.state.pid))
            first.kill()
            first.wait(timeout=10)
        # Pretend the recorded process started at another time: its pid was reused.
        doc = json.loads(paths.state_file.read_text())
        doc["processes"][0]["start_ticks"] -= 1
        paths.state_file.write_text(json.dumps(doc))

        with running_supervisor(paths):
            async with SupervisorClient(paths.sock) as client:
                info = await client.info("vm")
                assert info is not None
                assert info.state.status == "exited"
                await client.stop("vm")
                await client.remove("vm")
        assert alive(tracked[0])
    finally:
        if tracked is not None:
            kill_if_same(*tracked)


async def test_sigterm_exits_cleanly_and_leaves_children(paths: SupervisorPaths) -> None:
    """SIGTERM makes the supervisor exit 0 and remove its socket, leaving its children running."""
    tracked: tuple[int, int] | None = None
    proc = spawn_supervisor(paths)
    try:
        wait_answers(paths, proc, 10)
        async with SupervisorClient(paths.sock) as client:
            await client.deploy(sh_config(paths, "vm", "exec sleep 1000"))
            info = await client.info("vm")
            assert info is not None and info.state.pid is not None
            tracked = (info.state.pid, start_ticks(info.state.pid))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert alive(tracked[0])
        assert not paths.sock.exists()
        assert not paths.pid_file.exists()
        doc = json.loads(paths.state_file.read_text())
        assert doc["processes"][0]["state"]["status"] == "running"
    finally:
        kill_pid(proc.pid)
        proc.wait(timeout=10)
        if tracked is not None:
            kill_if_same(*tracked)


async def test_sighup_is_ignored(paths: SupervisorPaths) -> None:
    """SIGHUP (e.g. a closing terminal) does not end the supervisor."""
    with running_supervisor(paths) as proc:
        proc.send_signal(signal.SIGHUP)
        await wait_file_contains(paths.log_file, "ignoring SIGHUP")
        async with SupervisorClient(paths.sock) as client:
            assert await client.ping()
        assert proc.poll() is None


async def test_shutdown_kills_children_and_exits(paths: SupervisorPaths) -> None:
    """POST /shutdown SIGKILLs every running child, answers, and then the supervisor exits 0."""
    proc = spawn_supervisor(paths)
    pids: list[tuple[int, int]] = []
    try:
        wait_answers(paths, proc, 10)
        async with SupervisorClient(paths.sock) as client:
            for id in ("a", "b"):
                await client.deploy(sh_config(paths, id, "exec sleep 1000"))
                info = await client.info(id)
                assert info is not None and info.state.pid is not None
                pids.append((info.state.pid, start_ticks(info.state.pid)))
            await client.shutdown()
        assert proc.wait(timeout=10) == 0
        for pid, _ in pids:
            assert wait_gone(pid, 0)
        doc = json.loads(paths.state_file.read_text())
        assert {row["state"]["status"] for row in doc["processes"]} == {"stopped"}
    finally:
        kill_pid(proc.pid)
        proc.wait(timeout=10)
        for pid, ticks in pids:
            kill_if_same(pid, ticks)
