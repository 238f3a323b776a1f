"""Slow and numerous clients against the real daemon: deadlines, connection caps, fd exhaustion."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import selectors
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support import short_dirs
from tests.support.daemon_proc import DaemonProcess, running_daemon
from vmm.api.connection_guard import ThrottledLog

PARTIAL_HEAD = b"GET /prpc/Version HTTP/1.1\r\nHost: vmm\r\nX-Slow: "
LENGTH_BODY = (b"POST /prpc/Version?json HTTP/1.1\r\nHost: vmm\r\nContent-Type: application/json"
               b"\r\nContent-Length: 100000\r\n\r\n{")
CHUNKED_BODY = (b"POST /prpc/Version?json HTTP/1.1\r\nHost: vmm\r\nContent-Type: application/json"
                b"\r\nTransfer-Encoding: chunked\r\n\r\n1\r\n{\r\n")
FD_WARNING = "out of file descriptors"
ASYNCIO_ACCEPT_ERROR = "socket.accept() out of system resource"


@pytest.fixture
def workdir() -> Iterator[Path]:
    with short_dirs.short_dir("vmmslow") as path:
        yield path


@contextlib.contextmanager
def open_files_at_least(count: int) -> Iterator[None]:
    """Raise this process's RLIMIT_NOFILE (inherited by the daemon) for the test's duration."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= count:
        yield
        return
    if hard != resource.RLIM_INFINITY and hard < count:
        pytest.skip(f"needs {count} open files; the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (count, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def tcp_address(daemon: DaemonProcess) -> tuple[str, int]:
    host, port = daemon.base_url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def connect(daemon: DaemonProcess, unix: bool = False, send: bytes = b"") -> socket.socket:
    if unix:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(30)
        sock.connect(str(daemon.unix[0]))
    else:
        sock = socket.create_connection(tcp_address(daemon), timeout=30)
    if send:
        sock.sendall(send)
    return sock


def close_all(socks: list[socket.socket]) -> None:
    for sock in socks:
        sock.close()


def read_until_closed(socks: list[socket.socket], timeout: float) -> dict[socket.socket, bytes]:
    """Wait for the server to close each socket; what each received. Raises if some stay open."""
    received: dict[socket.socket, bytes] = dict.fromkeys(socks, b"")
    pending = set(socks)
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        for sock in socks:
            selector.register(sock, selectors.EVENT_READ, data=sock)
        while pending and time.monotonic() < deadline:
            for key, _ in selector.select(timeout=0.5):
                sock = key.data
                try:
                    data = sock.recv(65536)
                except ConnectionResetError:
                    data = b""
                if data:
                    received[sock] += data
                else:
                    selector.unregister(sock)
                    pending.discard(sock)
    assert not pending, f"{len(pending)} of {len(socks)} connections still open after {timeout}s"
    return received


def is_open(sock: socket.socket) -> bool:
    """Whether the server has neither closed nor answered ``sock`` (checked without waiting)."""
    timeout = sock.gettimeout()
    sock.settimeout(0)
    try:
        return sock.recv(1, socket.MSG_PEEK) != b""
    except BlockingIOError:  # nothing to read yet
        return True
    except ConnectionResetError:
        return False
    finally:
        sock.settimeout(timeout)


def barrier(daemon: DaemonProcess) -> None:
    """One round trip on the Unix listener: the daemon has by then read what was sent before."""
    with daemon.unix_client() as client:
        version_ok(client)


def log_since_start(daemon: DaemonProcess) -> str:
    with daemon.log_path.open("rb") as fp:
        fp.seek(daemon.log_offset)
        return fp.read().decode(errors="replace")


def wait_for_log(daemon: DaemonProcess, *texts: str, timeout: float = 30.0) -> None:
    """Wait until the daemon has logged one of ``texts``."""
    deadline = time.monotonic() + timeout
    while not any(text in log_since_start(daemon) for text in texts):
        assert time.monotonic() < deadline, f"none of {texts!r} logged after {timeout}s"
        time.sleep(0.1)


def eventually_ok(client: httpx.Client, timeout: float = 30.0) -> None:
    """The daemon answers again once it has noticed freed connections (retrying refusals)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            version_ok(client)
            return
        except (AssertionError, httpx.TransportError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def version_ok(client: httpx.Client) -> None:
    response = client.post("/prpc/Version?json", json={})
    assert response.status_code == 200, response.text
    assert response.headers["x-content-type-options"] == "nosniff"


def test_half_open_flood_is_closed_after_the_deadlines_and_normal_clients_are_served(
    workdir: Path,
) -> None:
    """Thousands of half-sent heads and endless bodies: clients answered, all closed, log quiet."""
    silent, heads, bodies = 500, 2000, 200  # on TCP; a tenth as many again on the Unix socket
    total = (silent + heads + bodies) * 11 // 10
    with open_files_at_least(total + 1024), running_daemon(
        workdir,
        addresses=["tcp:127.0.0.1:0", "unix:./vmm.sock"],
        extra_config="[server]\nheader_timeout = 3.0\nbody_timeout = 4.0\n"
                     "max_connections = 5000\n",
    ) as daemon:
        log_before = daemon.log_path.stat().st_size
        flood: dict[str, list[socket.socket]] = {"silent": [], "head": [], "body": []}
        try:
            for unix, scale in ((False, 10), (True, 1)):
                for _ in range(silent * scale // 10):
                    flood["silent"].append(connect(daemon, unix))
                for _ in range(heads * scale // 10):
                    flood["head"].append(connect(daemon, unix, PARTIAL_HEAD))
                for i in range(bodies * scale // 10):
                    body = LENGTH_BODY if i % 2 else CHUNKED_BODY
                    flood["body"].append(connect(daemon, unix, body))

            with daemon.client() as tcp, daemon.unix_client() as unix_client:
                version_ok(tcp)
                version_ok(unix_client)

            received = read_until_closed(flood["silent"] + flood["head"], timeout=60)
            answers = {data.split(b"\r\n", 1)[0] for data in received.values()}
            assert answers == {b"HTTP/1.1 408 Request Timeout"}
            read_until_closed(flood["body"], timeout=60)
        finally:
            for socks in flood.values():
                close_all(socks)

        with daemon.client() as tcp:
            version_ok(tcp)
        log = log_since_start(daemon)
        assert "did not send a request head in time" in log
        assert "did not send a request body in time" in log
        assert "Traceback" not in log
        assert daemon.log_path.stat().st_size - log_before < 20_000


def test_a_kept_alive_connection_has_a_deadline_for_its_next_head(workdir: Path) -> None:
    """After one answered request, a half-sent second head gets a 408 and the connection closes."""
    with running_daemon(workdir, extra_config="[server]\nheader_timeout = 2.0\n") as daemon:
        sock = connect(daemon, send=b"GET /prpc/Version HTTP/1.1\r\nHost: vmm\r\n\r\n")
        try:
            first = b""
            while b"}" not in first:
                chunk = sock.recv(65536)
                assert chunk, f"closed after {first!r}"
                first += chunk
            assert first.startswith(b"HTTP/1.1 200")
            sock.sendall(PARTIAL_HEAD)
            (answer,) = read_until_closed([sock], timeout=30).values()
        finally:
            sock.close()
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408")
        assert b"x-content-type-options: nosniff" in head
        assert b"server.header_timeout" in body


def test_a_full_listener_closes_the_connection_that_waited_longest(workdir: Path) -> None:
    """At the cap, a newcomer takes the slot of the oldest connection still sending its head."""
    cap = 20
    with running_daemon(
        workdir, addresses=["tcp:127.0.0.1:0", "unix:./vmm.sock"],
        extra_config=f"[server]\nmax_connections = {cap}\nheader_timeout = 120.0\n",
    ) as daemon:
        waiting = []
        try:
            for _ in range(cap):
                waiting.append(connect(daemon, send=PARTIAL_HEAD))
            barrier(daemon)
            with daemon.client() as client:
                version_ok(client)
            read_until_closed(waiting[:1], timeout=30)
            assert all(is_open(sock) for sock in waiting[1:])
        finally:
            close_all(waiting)
        wait_for_log(daemon, "closed 1 that waited longest for a request head")


def test_a_listener_full_of_busy_connections_refuses_with_503_and_recovers(
    workdir: Path,
) -> None:
    """At the cap with every connection mid-body, a newcomer gets a 503; freed slots serve again."""
    cap = 10
    with running_daemon(
        workdir, addresses=["tcp:127.0.0.1:0", "unix:./vmm.sock"],
        extra_config=f"[server]\nmax_connections = {cap}\nbody_timeout = 120.0\n",
    ) as daemon:
        busy = []
        try:
            for _ in range(cap):
                busy.append(connect(daemon, send=LENGTH_BODY))
            barrier(daemon)
            newcomer = connect(daemon)
            try:
                (answer,) = read_until_closed([newcomer], timeout=30).values()
            finally:
                newcomer.close()
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 503")
            assert b"x-frame-options: SAMEORIGIN" in head
            assert b"too many connections" in body
        finally:
            close_all(busy)
        with daemon.client() as client:
            eventually_ok(client)
        wait_for_log(daemon, f"{cap} connections open and all busy")


def test_fd_exhaustion_is_logged_once_per_interval_and_the_daemon_recovers(
    workdir: Path,
) -> None:
    """With descriptors exhausted, accept failures log one line, not one traceback a second."""
    with running_daemon(workdir, extra_config="[server]\nheader_timeout = 120.0\n") as daemon:
        in_use = len(list(Path(f"/proc/{daemon.pid}/fd").iterdir()))
        _, hard = resource.prlimit(daemon.pid, resource.RLIMIT_NOFILE)
        resource.prlimit(daemon.pid, resource.RLIMIT_NOFILE, (in_use + 20, hard))
        flood = []
        try:
            for _ in range(60):
                flood.append(connect(daemon, send=PARTIAL_HEAD))
            wait_for_log(daemon, FD_WARNING, ASYNCIO_ACCEPT_ERROR)
            # asyncio retries accept() every second; give it several tries to repeat itself.
            time.sleep(5)
            log = log_since_start(daemon)
        finally:
            close_all(flood)
        with daemon.client() as client:
            version_ok(client)
        assert log.count(FD_WARNING) <= 2, log
        assert ASYNCIO_ACCEPT_ERROR not in log
        assert "Traceback" not in log


def test_throttled_log_reports_a_burst_as_one_line_then_one_summary(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A burst of events logs once at once, then once with the count of the rest."""

    async def burst() -> None:
        throttled = ThrottledLog("saw %d events", interval=0.2)
        for _ in range(100):
            throttled.count()
        assert [r.getMessage() for r in caplog.records] == ["saw 1 events"]
        # Timers fire in deadline order: the summary's (0.2 s) before this sleep's end.
        await asyncio.sleep(0.5)

    with caplog.at_level(logging.WARNING, logger="vmm.api.connection_guard"):
        asyncio.run(burst())
    assert [r.getMessage() for r in caplog.records] == ["saw 1 events", "saw 99 events"]
