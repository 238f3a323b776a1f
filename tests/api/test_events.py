"""``GET /events`` on the real daemon: order, resume, filter, errors, disconnects, many clients."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.daemon_proc import DaemonProcess, start_daemon
from tests.support.vm_ops import FAKE_IMAGE, call, create, error_of, rpc, wait_for


@dataclass
class Sse:
    kind: str
    id: str
    data: Any
    comments: list[str]


def sse(lines: Iterator[str]) -> Iterator[Sse]:
    """Parse an SSE stream into its events (comments are kept with the event they precede)."""
    kind, ident = "message", ""
    data: list[str] = []
    comments: list[str] = []
    for line in lines:
        if line == "":
            if data or comments:
                yield Sse(kind, ident, json.loads("\n".join(data)) if data else None, comments)
            kind, ident, data, comments = "message", "", [], []
        elif line.startswith(":"):
            comments.append(line[1:].strip())
        else:
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "event":
                kind = value
            elif name == "id":
                ident = value
            elif name == "data":
                data.append(value)


def vm_events(stream: Iterator[Sse], until: str, vm_id: str) -> list[tuple[str, str]]:
    """(vm_id, event) pairs from ``stream`` until ``until`` arrives for ``vm_id``."""
    seen = []
    for item in stream:
        if item.kind != "vm":
            continue
        seen.append((item.data["vm_id"], item.data["event"]))
        if item.data["event"] == until and item.data["vm_id"] == vm_id:
            return seen
    raise AssertionError(f"stream ended before {until} for {vm_id}: {seen}")


def make_stopped(client: httpx.Client, name: str) -> str:
    return create(client, image=FAKE_IMAGE, name=name, stopped=True)


def remove(client: httpx.Client, vm_id: str) -> None:
    rpc(client, "RemoveVm", {"id": vm_id})
    wait_for("removal", lambda: not rpc(client, "GetInfo", {"id": vm_id})["found"], 30)


def test_lifecycle_events_arrive_in_order_with_status(daemon: DaemonProcess) -> None:
    """A create and a removal reach a live subscriber in order, each with its id and status."""
    with daemon.client() as client, client.stream("GET", "/events") as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        stream = sse(response.iter_lines())
        vm_id = make_stopped(client, "ev-order")
        rpc(client, "RemoveVm", {"id": vm_id})
        items = []
        for item in stream:
            if item.kind == "vm" and item.data["vm_id"] == vm_id:
                items.append(item)
                if item.data["event"] == "vmm.removed":
                    break
    assert [(i.data["event"], i.data["status"]) for i in items] == [
        ("vmm.created", "stopped"), ("vmm.removing", "removing"), ("vmm.removed", "removed")]
    ids = [int(i.id) for i in items]
    assert ids == sorted(ids) and len(set(ids)) == 3
    assert all(int(i.id) == i.data["seq"] for i in items)


def test_last_event_id_resumes_after_the_given_event(daemon: DaemonProcess) -> None:
    """A reconnect with Last-Event-ID gets exactly the events published after that id."""
    with daemon.client() as client:
        with client.stream("GET", "/events") as response:
            stream = sse(response.iter_lines())
            first = make_stopped(client, "ev-resume-a")
            created = next(i for i in stream if i.kind == "vm" and i.data["vm_id"] == first)
        # Disconnected: these happen while nobody listens.
        second = make_stopped(client, "ev-resume-b")
        remove(client, first)
        headers = {"Last-Event-ID": created.id}
        with client.stream("GET", "/events", headers=headers) as response:
            got = vm_events(sse(response.iter_lines()), "vmm.removed", first)
        remove(client, second)
    assert got == [(second, "vmm.created"), (first, "vmm.removing"), (first, "vmm.removed")]


def test_follow_false_replays_the_history_and_ends(daemon: DaemonProcess) -> None:
    """last_event_id=0 with follow=false sends the whole bounded history, then closes."""
    with daemon.client() as client:
        vm_id = make_stopped(client, "ev-history")
        response = client.get("/events", params={"last_event_id": "0", "follow": "false",
                                                 "id": vm_id})
    items = list(sse(iter(response.text.splitlines())))
    assert [i.data["event"] for i in items if i.kind == "vm"] == ["vmm.created"]


def test_id_filter_passes_only_the_named_vms(daemon: DaemonProcess) -> None:
    """?id= limits the stream to that VM's events."""
    with daemon.client() as client:
        wanted = make_stopped(client, "ev-filter-a")
        with client.stream("GET", "/events", params={"id": wanted}) as response:
            stream = sse(response.iter_lines())
            other = make_stopped(client, "ev-filter-b")
            remove(client, other)
            remove(client, wanted)
            got = vm_events(stream, "vmm.removed", wanted)
    assert got == [(wanted, "vmm.removing"), (wanted, "vmm.removed")]


@pytest.mark.parametrize(
    ("params", "headers", "field"),
    [
        ({"id": "../etc"}, {}, "id"),
        ({}, {"Last-Event-ID": "12x"}, "Last-Event-ID"),
        ({"last_event_id": "-1"}, {}, "last_event_id"),
        ({"heartbeat": "0"}, {}, "heartbeat"),
        ({"follow": "maybe"}, {}, "follow"),
    ],
)
def test_bad_parameters_get_a_400_naming_them(
    daemon: DaemonProcess, params: dict[str, str], headers: dict[str, str], field: str
) -> None:
    """Malformed ids, event ids, heartbeats and booleans are refused with the field named."""
    with daemon.client() as client:
        message = error_of(client.get("/events", params=params, headers=headers), 400)
    assert f"`{field}`" in message


def test_heartbeats_keep_an_idle_stream_alive(daemon: DaemonProcess) -> None:
    """With nothing happening the stream still sends heartbeat comments."""
    with daemon.client() as client, client.stream(
        "GET", "/events", params={"heartbeat": "0.1", "id": "nobody"}
    ) as response:
        lines = response.iter_lines()
        beats = 0
        for line in lines:
            beats += line == ": heartbeat"
            if beats == 2:
                break
    assert beats == 2


def subscribers_now(daemon: DaemonProcess) -> int:
    """How many subscribers the bus has, counting the probe itself (the stream's first comment)."""
    with daemon.client() as client, client.stream("GET", "/events") as response:
        for line in response.iter_lines():
            if line.startswith(": subscribers "):
                return int(line.split()[-1]) - 1
    raise AssertionError("no subscriber count")


def fd_count(pid: int) -> int:
    return sum(1 for _ in Path(f"/proc/{pid}/fd").iterdir())


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def open_raw_streams(daemon: DaemonProcess, count: int) -> list[socket.socket]:
    """``count`` SSE clients on plain sockets, each past its response head."""
    host, port = daemon.base_url.removeprefix("http://").split(":")
    socks = []
    for _ in range(count):
        sock = socket.create_connection((host, int(port)), timeout=10)
        sock.sendall(b"GET /events HTTP/1.1\r\nHost: vmm\r\n\r\n")
        socks.append(sock)
    for sock in socks:
        head = b""
        while b": subscribers" not in head:
            chunk = sock.recv(4096)
            assert chunk, "stream closed early"
            head += chunk
        assert head.startswith(b"HTTP/1.1 200")
    return socks


def test_disconnects_end_subscriptions_and_100_clients_leave_no_trace(
    daemon: DaemonProcess,
) -> None:
    """100 concurrent subscribers all get an event; after they leave, fds and memory are back."""
    pid = daemon.pid
    # A first round warms up what is allocated once (buffers, code paths).
    for sock in open_raw_streams(daemon, 100):
        sock.close()
    wait_for("subscribers gone", lambda: subscribers_now(daemon) == 0, 30)
    fds, rss = fd_count(pid), rss_kib(pid)

    socks = open_raw_streams(daemon, 100)
    try:
        assert subscribers_now(daemon) == 100
        with daemon.client() as client:
            vm_id = make_stopped(client, "ev-many")
        needle = f'"vm_id":"{vm_id}"'.encode()
        for sock in socks:
            got = b""
            while needle not in got:
                chunk = sock.recv(65536)
                assert chunk, "stream closed before the event"
                got += chunk
    finally:
        for sock in socks:
            sock.close()
    # Ended by the disconnect itself, not by a later heartbeat write (the default is 15 s).
    wait_for("subscribers gone", lambda: subscribers_now(daemon) == 0, 10)
    wait_for("fds back to baseline", lambda: fd_count(pid) <= fds, 10)
    assert rss_kib(pid) - rss < 4 * 1024, "memory grew by more than 4 MiB"
    with daemon.client() as client:
        remove(client, vm_id)


def test_events_need_credentials_like_every_api_route(short_tmp: Path) -> None:
    """With auth on, /events answers 401 without a token and streams with one."""
    auth = '[auth]\nenabled = true\ntokens = ["t0k"]\n'
    proc = start_daemon(short_tmp / "auth", extra_config=auth)
    try:
        with proc.client() as client:
            assert client.get("/events").status_code == 401
            with client.stream("GET", "/events", headers={"Authorization": "Bearer t0k"}) as ok:
                assert ok.status_code == 200
            assert call(client, "Version").status_code == 401
    finally:
        proc.destroy()


def test_cli_events_prints_the_history_of_a_vm(daemon: DaemonProcess) -> None:
    """``vmm-cli events --id ID`` prints that VM's events from the history and exits."""
    with daemon.client() as client:
        vm_id = make_stopped(client, "ev-cli")
        remove(client, vm_id)
    out = subprocess.run(
        [sys.executable, "-m", "vmm.client_cli", "--url", daemon.base_url, "events", "--id", vm_id],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout
    lines = [line.split(maxsplit=4)[1:4] for line in out.splitlines()]
    assert lines == [[vm_id, "stopped", "vmm.created"], [vm_id, "removing", "vmm.removing"],
                     [vm_id, "removed", "vmm.removed"]]


def test_a_script_asking_gets_a_401_without_a_basic_challenge(short_tmp: Path) -> None:
    """X-Requested-With drops WWW-Authenticate, so browsers show the console's prompt instead."""
    auth = '[auth]\nenabled = true\ntokens = ["t0k"]\n'
    proc = start_daemon(short_tmp / "challenge", extra_config=auth)
    try:
        with proc.client() as client:
            plain = call(client, "Version")
            scripted = client.post("/prpc/Version?json", json={},
                                   headers={"X-Requested-With": "vmm-console"})
    finally:
        proc.destroy()
    assert plain.status_code == scripted.status_code == 401
    assert plain.headers["www-authenticate"].startswith("Basic")
    assert "www-authenticate" not in scripted.headers
