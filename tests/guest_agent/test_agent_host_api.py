"""guest_agent.host_api and channel: HostApi calls over frames and HTTP, ordering, port lookup."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from guest_agent import api_server, host_api, httpclient
from guest_agent.channel import PortChannel, find_port
from guest_agent.guest_api import GuestApi
from guest_agent.host_api import (
    HostApiError,
    Notifier,
    SerialHostApi,
    VsockHostApi,
    choose,
    parse_host_api_url,
    vsock_target,
)
from guest_agent.identity import Identity
from tests.guest_agent.agent_harness import HostApiPeer, accept, listen_unix
from tests.support.short_dirs import short_dir
from vmm.backend.qemu import argv as qemu_argv


@pytest.fixture
def sockdir() -> Iterator[Path]:
    with short_dir("ga") as path:
        yield path


def answer_by_method(path: str, body: bytes) -> tuple[int, bytes]:
    if path.startswith("/api/Info"):
        return 200, b'{"name": "dstack VMM", "version": "test"}'
    if path.startswith("/api/GetSealingKey"):
        return 400, b'{"error": "Key provider is not enabled"}'
    return 200, b"null"


def test_serial_calls_match_their_answers_and_drop_strays(sockdir: Path) -> None:
    """Each call gets its own answer despite garbage and answers for other ids; errors raise."""
    listener = listen_unix(sockdir / "host.sock")
    with HostApiPeer(lambda: accept(listener, 0.5), answer_by_method, noise=True) as peer:
        api = SerialHostApi(PortChannel(sockdir / "host.sock"))
        assert api.info() == {"name": "dstack VMM", "version": "test"}
        api.notify("boot.progress", "one")
        api.notify("boot.progress", "two")
        with pytest.raises(HostApiError, match="Key provider is not enabled"):
            api.get_sealing_key(b"\x01\x02")
        assert peer.notifications() == [("boot.progress", "one"), ("boot.progress", "two")]
        assert peer.calls[-1] == ("/api/GetSealingKey?json", {"quote": "0102"})
        api.channel.close()
    listener.close()


def test_serial_call_times_out_without_an_answer(sockdir: Path) -> None:
    """A host that reads but never answers makes the call fail after its timeout."""
    listener = listen_unix(sockdir / "host.sock")
    api = SerialHostApi(PortChannel(sockdir / "host.sock"))
    started = time.monotonic()
    result: list[BaseException] = []

    def call() -> None:
        try:
            api.notify("x", "y", timeout=1.0)
        except HostApiError as exc:
            result.append(exc)

    thread = threading.Thread(target=call)
    thread.start()
    conn = accept(listener, 5)
    thread.join(timeout=10)
    assert result and "no answer" in str(result[0])
    assert 0.9 < time.monotonic() - started < 5
    conn.close()
    listener.close()
    api.channel.close()


def test_serial_call_fails_when_nobody_listens(sockdir: Path) -> None:
    """Without a host on the port, a call fails within its timeout instead of hanging."""
    api = SerialHostApi(PortChannel(sockdir / "absent.sock"))
    started = time.monotonic()
    with pytest.raises(HostApiError, match="not connected"):
        api.notify("x", "y", timeout=0.5)
    assert time.monotonic() - started < 3


class _HostApiHTTP(BaseHTTPRequestHandler):
    seen: list[tuple[str, object]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.seen.append((self.path, json.loads(body)))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", "4")
        self.end_headers()
        self.wfile.write(b"null")

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_http_transport_posts_prpc_json_under_the_url_prefix() -> None:
    """The vsock transport POSTs /<prefix>/Notify?json with the event as JSON (here over TCP)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _HostApiHTTP)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        api = VsockHostApi(2, 10000, "/api")
        port = server.server_address[1]

        def tcp(timeout: float) -> socket.socket:
            return socket.create_connection(("127.0.0.1", port), timeout=timeout)

        api.connect = tcp
        api.notify("boot.progress", "done")
        assert _HostApiHTTP.seen == [("/api/Notify?json", {"event": "boot.progress", "payload": "done"})]
        api.connect = httpclient.unix_connector("/nonexistent/sock")
        with pytest.raises(HostApiError):
            api.notify("boot.progress", "done")
    finally:
        server.shutdown()
        server.server_close()


def test_host_api_url_comes_from_sys_config(tmp_path: Path) -> None:
    """host_api_url "vsock://2:<port>/api" sets the target; port 10000 when absent."""
    assert parse_host_api_url("vsock://2:10123/api") == (2, 10123, "/api")
    assert parse_host_api_url("vsock://2/") == (2, 10000, "/")
    assert parse_host_api_url("http://x") is None
    assert vsock_target(tmp_path) == (2, 10000, "/api")
    (tmp_path / ".sys-config.json").write_text(json.dumps({"host_api_url": "vsock://2:12000/api"}))
    assert vsock_target(tmp_path) == (2, 12000, "/api")


def test_transport_choice_prefers_override_then_vsock(tmp_path: Path) -> None:
    """An explicit port wins, then vsock when the guest has a CID, else the named serial port."""
    override = choose(tmp_path, tmp_path / "p.sock", 3, print)
    assert isinstance(override, SerialHostApi)
    via_vsock = choose(tmp_path, None, 3, print)
    assert isinstance(via_vsock, VsockHostApi) and via_vsock.description == "vsock://2:10000/api"


def test_notifier_sends_in_order_including_events_queued_before_attach(sockdir: Path) -> None:
    """Events queued before the transport is known are sent first, in order."""
    listener = listen_unix(sockdir / "host.sock")
    with HostApiPeer(lambda: accept(listener, 0.5)) as peer:
        notifier = Notifier(print)
        notifier.notify("boot.progress", "a")
        notifier.notify("instance.info", "{}")
        notifier.attach(SerialHostApi(PortChannel(sockdir / "host.sock")))
        assert notifier.notify_wait("boot.progress", "done", timeout=10)
        assert peer.notifications() == [
            ("boot.progress", "a"),
            ("instance.info", "{}"),
            ("boot.progress", "done"),
        ]
    listener.close()


def test_notifier_without_a_transport_drops_events() -> None:
    """With no host API channel, notifications complete at once and nothing blocks."""
    notifier = Notifier(print)
    notifier.attach(None)
    assert notifier.notify_wait("boot.progress", "done", timeout=5)


def test_ports_are_found_by_name_in_sysfs(tmp_path: Path) -> None:
    """The port node is /dev/<vportNpM> whose sysfs name matches, whatever N and M are."""
    for entry, name in (("vport0p1", "org.other\n"), ("vport1p2", "org.vmm.host-api\n")):
        (tmp_path / entry).mkdir()
        (tmp_path / entry / "name").write_text(name)
    (tmp_path / "vport2p1").mkdir()  # no name file
    assert find_port("org.vmm.host-api", tmp_path, Path("/dev")) == Path("/dev/vport1p2")
    assert find_port("org.vmm.guest-agent", tmp_path) is None
    assert find_port("x", tmp_path / "absent") is None


def test_a_non_socket_path_is_opened_read_write(tmp_path: Path) -> None:
    """A FIFO stands in for a character device: opened read-write, bytes go out and come in."""
    fifo = tmp_path / "port"
    os.mkfifo(fifo)
    channel = PortChannel(fifo)
    try:
        assert channel.recv(0.1) == b""  # opened: a fresh stream
        assert channel.send(b"hello", 1.0)
        assert channel.recv(1.0) == b"hello"
        assert channel.recv(0.05) is None
    finally:
        channel.close()


def test_port_names_match_the_daemons_qemu_argv() -> None:
    """The agent looks for the port names vmm/qemu_argv.py gives QEMU."""
    assert api_server.AGENT_PORT_NAME == qemu_argv.AGENT_PORT_NAME
    assert host_api.HOST_API_PORT_NAME == qemu_argv.HOST_API_PORT_NAME


def test_vsock_listener_binds_any_cid() -> None:
    """The vsock guest API listener binds (VMADDR_CID_ANY, port) where AF_VSOCK works."""
    if not hasattr(socket, "AF_VSOCK"):
        pytest.skip("no AF_VSOCK in this Python")
    api = GuestApi(Identity(b"a" * 20, b"s" * 20, b"i" * 20, b"d" * 32), lambda: None)
    try:
        server = api_server.VsockApiHTTPServer(0xFFFFFFFF, api)  # VMADDR_PORT_ANY
    except OSError as exc:
        pytest.skip(f"vsock unavailable here: {exc}")
    try:
        assert server.socket.family == socket.AF_VSOCK
        assert server.server_name == "vsock"
    finally:
        server.server_close()
