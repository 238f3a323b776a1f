"""The supervisor's API against a real supervisor process and real children."""

from __future__ import annotations

import os
from collections.abc import Iterator
from urllib.parse import quote

import httpx
import pytest

from tests.support.short_dirs import short_dir
from tests.support.supervisor_proc import (
    SupervisorPaths,
    alive,
    proc_status,
    release_fifo,
    running_supervisor,
    sh_config,
    wait_file_contains,
    wait_gone,
    wait_status,
)
from vmm.core.exceptions import SupervisorError
from vmm.supervisor.client import SupervisorClient

pytestmark = pytest.mark.anyio


@pytest.fixture
def paths() -> Iterator[SupervisorPaths]:
    """Here every test talks to a supervisor that is already running."""
    with short_dir() as root, running_supervisor(SupervisorPaths.in_dir(root)):
        yield SupervisorPaths.in_dir(root)


def raw(paths: SupervisorPaths) -> httpx.Client:
    return httpx.Client(
        transport=httpx.HTTPTransport(uds=str(paths.sock)), base_url="http://s", timeout=5
    )


async def test_deploy_runs_child_with_output_in_files(paths: SupervisorPaths) -> None:
    """A deployed process runs, its pidfile holds its pid, and its stdout/stderr reach the files."""
    async with SupervisorClient(paths.sock) as client:
        await client.deploy(sh_config(paths, "a", "echo out; echo err >&2; exec sleep 1000"))
        info = await client.info("a")
        assert info is not None
        assert info.state.status == "running"
        assert info.state.started
        assert info.state.pid is not None
        assert info.state.started_at is not None
        assert alive(info.state.pid)
        assert (paths.root / "a.pid").read_text().strip() == str(info.state.pid)
        assert await wait_file_contains(paths.root / "a.out", "out") == "out\n"
        assert await wait_file_contains(paths.root / "a.err", "err") == "err\n"
        status = proc_status(info.state.pid)
        # Default signal dispositions: nothing the supervisor ignores leaks into a VM.
        assert "SigIgn:\t0000000000000000" in status
        assert "SigBlk:\t0000000000000000" in status
        assert os.getsid(info.state.pid) == info.state.pid


async def test_child_gets_env_overlay_and_cwd(paths: SupervisorPaths) -> None:
    """The child sees the supervisor's environment overlaid with config.env, in config.cwd."""
    work = paths.root / "work"
    work.mkdir()
    config = sh_config(
        paths,
        "e",
        'echo "$PWD|$GREETING|${PATH:+path-set}"',
        env={"GREETING": "hello"},
        cwd=str(work),
    )
    async with SupervisorClient(paths.sock) as client:
        await client.deploy(config)
        await wait_status(client, "e", "exited")
        assert (paths.root / "e.out").read_text() == f"{work}|hello|path-set\n"


async def test_natural_exit_records_code(paths: SupervisorPaths) -> None:
    """A process that exits by itself reads as exited with its exit code."""
    async with SupervisorClient(paths.sock) as client:
        await client.deploy(sh_config(paths, "x", "exit 3"))
        info = await wait_status(client, "x", "exited")
        assert info.state.exit_code == 3
        assert info.state.signal is None
        assert info.state.started
        assert info.state.stopped_at is not None


async def test_stop_then_start_again(paths: SupervisorPaths) -> None:
    """Stop kills and reaps the child (status stopped); start runs it again with a new pid."""
    async with SupervisorClient(paths.sock) as client:
        await client.deploy(sh_config(paths, "s", "exec sleep 1000"))
        first = await client.info("s")
        assert first is not None and first.state.pid is not None
        await client.stop("s")
        stopped = await client.info("s")
        assert stopped is not None
        assert stopped.state.status == "stopped"
        assert not stopped.state.started
        assert stopped.state.signal == 9
        assert wait_gone(first.state.pid, 0)
        await client.start("s")
        again = await client.info("s")
        assert again is not None and again.state.pid is not None
        assert again.state.status == "running"
        assert again.state.pid != first.state.pid
        assert (paths.root / "s.pid").read_text().strip() == str(again.state.pid)
        await client.stop("s")


async def test_stop_of_exited_process_marks_it_stopped(paths: SupervisorPaths) -> None:
    """Stopping a process that already exited just records it as stopped."""
    async with SupervisorClient(paths.sock) as client:
        await client.deploy(sh_config(paths, "q", "exit 0"))
        await wait_status(client, "q", "exited")
        await client.stop("q")
        info = await client.info("q")
        assert info is not None
        assert (info.state.status, info.state.started) == ("stopped", False)


async def test_remove_refused_while_running(paths: SupervisorPaths) -> None:
    """Remove is refused (409) while the process runs and forgets it once stopped."""
    async with SupervisorClient(paths.sock) as client:
        await client.deploy(sh_config(paths, "r", "exec sleep 1000"))
        with pytest.raises(SupervisorError, match="running"):
            await client.remove("r")
        with raw(paths) as http:
            assert http.delete("/remove/r").status_code == 409
        await client.stop("r")
        await client.remove("r")
        assert await client.info("r") is None


async def test_list_and_clear(paths: SupervisorPaths) -> None:
    """List shows every process; clear forgets the non-running ones only."""
    async with SupervisorClient(paths.sock) as client:
        await client.deploy(sh_config(paths, "live", "exec sleep 1000"))
        await client.deploy(sh_config(paths, "done", "exit 0"))
        await wait_status(client, "done", "exited")
        assert sorted(i.config.id for i in await client.list()) == ["done", "live"]
        await client.clear()
        assert [i.config.id for i in await client.list()] == ["live"]
        await client.stop("live")


async def test_unknown_id(paths: SupervisorPaths) -> None:
    """An unknown id is 404 for start/stop/remove and null for info."""
    async with SupervisorClient(paths.sock) as client:
        assert await client.info("nope") is None
        for call in (client.start, client.stop, client.remove):
            with pytest.raises(SupervisorError, match="not found"):
                await call("nope")
    with raw(paths) as http:
        assert http.post("/start/nope").status_code == 404
        assert http.post("/stop/nope").status_code == 404
        assert http.delete("/remove/nope").status_code == 404
        assert http.get("/info/nope").json() == {"data": None}


async def test_deploy_refuses_running_duplicate_and_replaces_stopped(
    paths: SupervisorPaths,
) -> None:
    """Deploying a running id is refused; deploying over a stopped one replaces its config."""
    async with SupervisorClient(paths.sock) as client:
        await client.deploy(sh_config(paths, "d", "exec sleep 1000"))
        with pytest.raises(SupervisorError, match="already running"):
            await client.deploy(sh_config(paths, "d", "exec sleep 1000"))
        await client.stop("d")
        await client.deploy(sh_config(paths, "d", "exit 5"))
        info = await wait_status(client, "d", "exited")
        assert info.state.exit_code == 5
        assert info.config.args == ["-c", "exit 5"]


async def test_bad_config_is_400_naming_the_field(paths: SupervisorPaths) -> None:
    """A config with a missing field, an empty id or a non-JSON body is refused with 400."""
    doc = sh_config(paths, "b", "true").to_json()
    del doc["stdout"]
    with raw(paths) as http:
        reply = http.post("/deploy", json=doc)
        assert reply.status_code == 400
        assert "stdout" in reply.json()["error"]
        reply = http.post("/deploy", json={**sh_config(paths, "b", "true").to_json(), "id": ""})
        assert reply.status_code == 400
        assert "`id`" in reply.json()["error"]
        reply = http.post("/deploy", content=b"{not json")
        assert reply.status_code == 400
        assert http.get("/list").json() == {"data": []}


async def test_spawn_failure_is_error_status(paths: SupervisorPaths) -> None:
    """A command that cannot be executed is refused (400) and recorded with status error."""
    config = sh_config(paths, "bad", "", command=str(paths.root / "no-such-binary"))
    async with SupervisorClient(paths.sock) as client:
        with pytest.raises(SupervisorError, match="no-such-binary"):
            await client.deploy(config)
        info = await client.info("bad")
        assert info is not None
        assert info.state.status == "error"
        assert info.state.error is not None and "no-such-binary" in info.state.error
        assert info.state.pid is None
    with raw(paths) as http:
        assert http.post("/start/bad").status_code == 400


async def test_unwritable_pidfile_fails_the_deploy(paths: SupervisorPaths) -> None:
    """If the pidfile cannot be written the child is killed and the deploy refused."""
    config = sh_config(paths, "p", "exec sleep 1000", pidfile=str(paths.root / "no" / "p.pid"))
    async with SupervisorClient(paths.sock) as client:
        with pytest.raises(SupervisorError, match="cannot write pidfile"):
            await client.deploy(config)
        info = await client.info("p")
        assert info is not None and info.state.pid is not None
        assert info.state.status == "error"
        assert wait_gone(info.state.pid, 0)


async def test_truncated_log_is_written_from_the_start(paths: SupervisorPaths) -> None:
    """Output is appended, so truncating the log in place (rotation) leaves no hole."""
    fifo = paths.root / "go"
    os.mkfifo(fifo)
    script = f"echo first; read x < {fifo}; echo second; exec sleep 1000"
    async with SupervisorClient(paths.sock) as client:
        await client.deploy(sh_config(paths, "t", script))
        out = paths.root / "t.out"
        await wait_file_contains(out, "first")
        with out.open("r+") as f:
            f.truncate(0)
        release_fifo(fifo)
        assert await wait_file_contains(out, "second") == "second\n"
        await client.stop("t")


@pytest.mark.parametrize("bad", ["..", ".", "a/b", "a\nb", "a b", "x" * 65])
async def test_ids_that_are_not_names_are_400(paths: SupervisorPaths, bad: str) -> None:
    """Deploy and every per-id route refuse an id outside the VM id rule with 400 naming `id`."""
    seg = quote(bad, safe="").replace(".", "%2E")  # percent-encoded so no client normalises it
    with raw(paths) as http:
        replies = [
            http.post("/deploy", json={**sh_config(paths, "b", "true").to_json(), "id": bad}),
            http.post(f"/start/{seg}"),
            http.post(f"/stop/{seg}"),
            http.delete(f"/remove/{seg}"),
            http.get(f"/info/{seg}"),
        ]
        for reply in replies:
            assert reply.status_code == 400, (reply.request.url, reply.text)
            assert "invalid field `id`" in reply.json()["error"]
        assert http.get("/list").json() == {"data": []}
