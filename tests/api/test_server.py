"""Listeners: Unix socket permissions, stale and live sockets, TCP and Unix together."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import short_dirs
from tests.support.daemon_proc import checkout_env, start_daemon, write_config
from vmm.api.server import bind_tcp, bind_unix
from vmm.core.exceptions import ConfigError


@pytest.fixture
def short_dir() -> Iterator[Path]:
    with short_dirs.short_dir("vmms") as path:
        yield path


def test_stale_socket_file_is_replaced(short_dir: Path) -> None:
    """A socket file nobody listens on (left by a crash) is replaced at start."""
    stale = short_dir / "vmm.sock"
    leftover = socket.socket(socket.AF_UNIX)
    leftover.bind(str(stale))
    leftover.close()
    daemon = start_daemon(short_dir, addresses=["unix:./vmm.sock"])
    try:
        with daemon.unix_client() as client:
            assert client.post("/prpc/Version?json").status_code == 200
    finally:
        daemon.destroy()


def test_live_socket_is_not_replaced(short_dir: Path) -> None:
    """A second daemon on a socket that answers refuses to start, with a clear error."""
    first = start_daemon(short_dir, addresses=["unix:./vmm.sock"])
    try:
        (short_dir / "second").mkdir()
        config = write_config(short_dir / "second", ["unix:../vmm.sock"])
        result = subprocess.run(
            [sys.executable, "-m", "vmm", "-c", str(config), "serve"],
            cwd=short_dir / "second", capture_output=True, text=True, timeout=60, check=False,
            env=checkout_env(),
        )
        assert result.returncode == 2
        assert "another process is already listening" in result.stderr
        with first.unix_client() as client:
            assert client.post("/prpc/Version?json").status_code == 200
    finally:
        first.destroy()


def test_a_regular_file_is_never_replaced(short_dir: Path) -> None:
    """A non-socket file at the socket path is left alone and reported."""
    path = short_dir / "data.txt"
    path.write_text("keep me")
    with pytest.raises(ConfigError, match="not a socket"):
        bind_unix(path)
    assert path.read_text() == "keep me"


def test_socket_is_0600_even_with_a_lax_umask(short_dir: Path) -> None:
    """The socket is private from the moment it exists, whatever the umask."""
    old = os.umask(0)
    try:
        sock = bind_unix(short_dir / "a.sock")
    finally:
        os.umask(old)
    try:
        assert (short_dir / "a.sock").stat().st_mode & 0o777 == 0o600
    finally:
        sock.close()


def test_socket_removed_on_clean_shutdown(short_dir: Path) -> None:
    """SIGTERM stops the daemon cleanly and removes its socket file."""
    daemon = start_daemon(short_dir, addresses=["unix:./vmm.sock", "tcp:127.0.0.1:0"])
    try:
        daemon.stop()
        assert daemon.proc.returncode == 0
        assert not (short_dir / "vmm.sock").exists()
    finally:
        daemon.destroy()


def test_tcp_listener_declares_tcp_so_connections_get_nodelay() -> None:
    """The TCP listener's proto is IPPROTO_TCP, which asyncio needs to set TCP_NODELAY."""
    sock = bind_tcp("127.0.0.1", 0)
    try:
        assert sock.proto == socket.IPPROTO_TCP
        client = socket.create_connection(sock.getsockname())
        accepted, _ = sock.accept()
        assert accepted.proto == socket.IPPROTO_TCP
        accepted.close()
        client.close()
    finally:
        sock.close()


def test_tcp_port_in_use_is_a_clear_error(short_dir: Path) -> None:
    """A TCP port already taken stops the daemon with the address in the message."""
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        config = write_config(short_dir, [f"tcp:127.0.0.1:{port}"])
        result = subprocess.run(
            [sys.executable, "-m", "vmm", "-c", str(config), "serve"],
            cwd=short_dir, capture_output=True, text=True, timeout=60, check=False,
            env=checkout_env(),
        )
    finally:
        taken.close()
    assert result.returncode == 2
    assert f"cannot listen on tcp:127.0.0.1:{port}" in result.stderr
