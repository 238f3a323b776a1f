"""How a supervisor process starts: its socket, its files, and refusing to run twice."""

from __future__ import annotations

import socket
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import replace

import pytest

from tests.support.short_dirs import short_dir
from tests.support.supervisor_proc import (
    SupervisorPaths,
    answers,
    child_env,
    running_supervisor,
    spawn_supervisor,
    wait_answers,
)


@pytest.fixture
def paths() -> Iterator[SupervisorPaths]:
    with short_dir() as root:
        yield SupervisorPaths.in_dir(root)


def refused_start(paths: SupervisorPaths) -> tuple[int, str]:
    """Run a supervisor that is expected to refuse; return its exit code and stderr."""
    try:
        done = subprocess.run(
            paths.argv(), capture_output=True, env=child_env(), timeout=20, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError("the second supervisor did not refuse: it kept running") from exc
    return done.returncode, done.stderr.decode()


def test_socket_is_private_and_pid_file_written(paths: SupervisorPaths) -> None:
    """The socket (in directories created for it) is mode 0600; the pid file holds the pid."""
    nested = paths.root / "run" / "nested"
    paths = replace(paths, sock=nested / "s.sock", pid_file=nested / "sv.pid")
    with running_supervisor(paths) as proc:
        mode = paths.sock.stat().st_mode
        assert stat.S_ISSOCK(mode)
        assert stat.S_IMODE(mode) == 0o600
        assert paths.pid_file.read_text() == f"{proc.pid}\n"


def test_default_state_file_is_next_to_pid_file(paths: SupervisorPaths) -> None:
    """Without --state-file the table is kept in supervisor-state.json beside the pid file."""
    argv = [a for a in paths.argv() if a != str(paths.state_file)]
    argv.remove("--state-file")
    with (paths.root / "stderr").open("ab") as err:
        proc = subprocess.Popen(argv, stderr=err, env=child_env())
    try:
        wait_answers(paths, proc, 10)
        with socket.socket(socket.AF_UNIX) as conn:
            conn.connect(str(paths.sock))
            conn.sendall(b"POST /clear HTTP/1.1\r\nHost: s\r\nContent-Length: 0\r\n\r\n")
            assert conn.recv(100).startswith(b"HTTP/1.1 200")
        assert (paths.pid_file.parent / "supervisor-state.json").exists()
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_stale_socket_is_replaced(paths: SupervisorPaths) -> None:
    """A socket file nobody listens on (left by a killed supervisor) is replaced."""
    with socket.socket(socket.AF_UNIX) as stale:
        stale.bind(str(paths.sock))
    assert paths.sock.exists()
    assert not answers(paths.sock)
    with running_supervisor(paths):
        assert answers(paths.sock)


def test_second_supervisor_refuses_to_start(paths: SupervisorPaths) -> None:
    """While one supervisor answers, another on the same socket exits 2 and leaves it alone."""
    with running_supervisor(paths):
        code, err = refused_start(paths)
        assert code == 2
        assert "already running" in err
        assert answers(paths.sock)


def test_refuses_when_something_else_listens(paths: SupervisorPaths) -> None:
    """A live listener on the socket path is never replaced, even one holding no lock."""
    with socket.socket(socket.AF_UNIX) as other:
        other.bind(str(paths.sock))
        other.listen(8)
        code, err = refused_start(paths)
    assert code == 2
    assert "already listening" in err


def test_refuses_to_replace_a_regular_file(paths: SupervisorPaths) -> None:
    """A regular file at the socket path is not deleted: the supervisor exits 2 instead."""
    paths.sock.write_text("precious")
    code, err = refused_start(paths)
    assert code == 2
    assert "not a socket" in err
    assert paths.sock.read_text() == "precious"


def test_unreadable_state_file_refuses_start(paths: SupervisorPaths) -> None:
    """A corrupt state file stops the start (exit 2) rather than orphaning what it lists."""
    paths.state_file.write_text("{not json")
    proc = spawn_supervisor(paths)
    try:
        assert proc.wait(timeout=20) == 2
        assert "cannot read state file" in (paths.root / "stderr").read_text()
        assert not paths.sock.exists()
        assert paths.state_file.read_text() == "{not json"
    finally:
        proc.kill()
        proc.wait(timeout=10)
