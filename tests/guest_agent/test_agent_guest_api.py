"""The guest agent as a process on the host: GuestApi over HTTP and frames, host API events."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import socketserver
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest

from guest_agent import BOOT_MARKER
from guest_agent.framing import REQUEST, RESPONSE
from tests.guest_agent.agent_harness import (
    AgentProcess,
    FrameStream,
    GuestApiClient,
    HostApiPeer,
    accept,
    listen_unix,
    running_agent,
)
from tests.support.short_dirs import short_dir

COMPOSE = json.dumps({"manifest_version": 2, "name": "agent-test"}).encode()
APP_ID = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A short directory: Unix socket paths must stay under 108 bytes."""
    with short_dir("ga") as path:
        yield path


class Booted:
    """A running agent with its two serial peers connected."""

    def __init__(
        self, workdir: Path, host: HostApiPeer, listener: socket.socket, agent: AgentProcess
    ) -> None:
        self.workdir = workdir
        self.host = host
        self.listener = listener
        self.agent = agent
        self.stream = FrameStream(accept(listener, 10))
        self.client = GuestApiClient(self.stream)
        self.api_port = agent.api_port

    def http(self, method: str, verb: str = "POST", query: str = "?json") -> tuple[int, Any]:
        url = f"http://127.0.0.1:{self.api_port}/api/{method}{query}"
        data = b"" if verb == "POST" else None
        req = urllib.request.Request(url, data=data, method=verb)
        if verb == "POST":
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                assert resp.headers["Content-Type"] == "application/json"
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code, json.loads(exc.read())


@pytest.fixture
def booted(workdir: Path) -> Iterator[Booted]:
    share = workdir / "share"
    share.mkdir()
    (share / "app-compose.json").write_bytes(COMPOSE)
    agent_listener = listen_unix(workdir / "agent.sock")
    host_listener = listen_unix(workdir / "host.sock")
    peer = HostApiPeer(lambda: accept(host_listener, 0.5), noise=True)
    try:
        with peer, running_agent(
            workdir,
            "--agent-port", str(workdir / "agent.sock"),
            "--host-api-port", str(workdir / "host.sock"),
            share=share,
        ) as agent:  # fmt: skip
            agent.wait_booted()
            state = Booted(workdir, peer, agent_listener, agent)
            try:
                yield state
            finally:
                state.stream.close()
    finally:
        agent_listener.close()
        host_listener.close()


def meminfo_bytes(key: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def check_sys_info(info: dict[str, Any]) -> None:
    assert info["num_cpus"] == os.cpu_count()
    assert info["total_memory"] == meminfo_bytes("MemTotal")
    assert info["total_swap"] == meminfo_bytes("SwapTotal")
    assert 0 < info["available_memory"] <= info["total_memory"]
    assert info["used_memory"] + info["available_memory"] == info["total_memory"]
    assert info["kernel_version"] == os.uname().release
    assert abs(info["uptime"] - float(Path("/proc/uptime").read_text().split()[0])) < 5
    assert info["os_name"] and info["cpu_model"]
    root = [d for d in info["disks"] if d["mount_point"] == "/"]
    if root:
        st = os.statvfs("/")
        assert root[0]["total_size"] == st.f_blocks * st.f_frsize
        assert root[0]["name"].startswith("/dev/")
    for key in ("loadavg_one", "loadavg_five", "loadavg_fifteen"):
        assert isinstance(info[key], int)


def check_network_info(info: dict[str, Any]) -> None:
    by_name = {iface["name"]: iface for iface in info["interfaces"]}
    assert set(by_name) == {p.name for p in Path("/sys/class/net").iterdir()}
    assert {"address": "127.0.0.1", "prefix": 8} in by_name["lo"]["addresses"]
    assert by_name["lo"]["rx_bytes"] > 0
    resolv = Path("/etc/resolv.conf").read_text() if Path("/etc/resolv.conf").exists() else ""
    servers = [line.split()[1] for line in resolv.splitlines() if line.startswith("nameserver ")]
    assert info["dns_servers"] == list(dict.fromkeys(servers))
    assert info["wg_info"] == ""


def test_every_method_answers_from_host_data_over_http_and_frames(booted: Booted) -> None:
    """Info, SysInfo, NetworkInfo and ListContainers answer the same real data on both transports."""
    for call in (booted.http, booted.client.call):
        status, info = call("Info")
        assert status == 200
        assert info["app_id"] == hashlib.sha256(COMPOSE).hexdigest()[:40]
        assert len(bytes.fromhex(info["instance_id"])) == 20
        assert len(bytes.fromhex(info["device_id"])) == 32
        assert json.loads(info["tcb_info"]) == {"tee": "none", "development": True}
        assert "DEVELOPMENT PLACEHOLDER" in info["app_cert"]

        status, sys_info = call("SysInfo")
        assert status == 200
        check_sys_info(sys_info)

        status, net = call("NetworkInfo")
        assert status == 200
        check_network_info(net)

        assert call("ListContainers") == (200, {"containers": []})


def test_http_accepts_get_and_post_without_query(booted: Booted) -> None:
    """GET /api/Info and POST /api/Info (no ?json) answer JSON as well."""
    assert booted.http("Info", verb="GET", query="")[0] == 200
    assert booted.http("SysInfo", verb="POST", query="")[0] == 200


def test_unknown_method_is_400_service_not_found(booted: Booted) -> None:
    """An unknown method is HTTP 400 {"error": "Service not found: <name>"} on both transports."""
    assert booted.http("Frobnicate") == (400, {"error": "Service not found: Frobnicate"})
    assert booted.client.call("Frobnicate") == (400, {"error": "Service not found: Frobnicate"})


def test_boot_reports_progress_then_instance_info_and_done_last(booted: Booted) -> None:
    """The host API peer sees boot.progress steps, instance.info per §9, and "done" last."""
    booted.host.wait_for("boot.progress", "done", timeout=10)
    events = booted.host.notifications()
    progress = [payload for event, payload in events if event == "boot.progress"]
    assert progress[0] == "mounting host share"
    assert "starting services" in progress
    assert progress[-1] == "done"
    assert events[-1] == ("boot.progress", "done")
    assert not [e for e in events if e[0] == "boot.error"]

    info = json.loads(booted.host.wait_for("instance.info"))
    seed = bytes.fromhex(info["instance_id_seed"])
    app_id = hashlib.sha256(COMPOSE).digest()[:20]
    assert len(seed) == 20
    assert info["app_id"] == app_id.hex()
    assert info["instance_id"] == hashlib.sha256(seed + app_id).hexdigest()[:40]
    assert (booted.workdir / "state" / "instance_id_seed").read_text().strip() == seed.hex()
    assert booted.client.call("Info")[1]["instance_id"] == info["instance_id"]


def test_garbage_and_corrupt_frames_are_skipped(booted: Booted) -> None:
    """Noise, a bad CRC, a bad kind, a bad envelope and stray responses do not stop the next call."""
    client = booted.client
    good = client.request_frame("Info", 2)
    bad_crc = bytearray(client.request_frame("Info", 3))
    bad_crc[-1] ^= 0xFF
    bad_kind = bytearray(client.request_frame("Info", 4))
    bad_kind[4] = 9
    booted.stream.send_raw(os.urandom(300).replace(b"\x7fVMM", b"") + bytes(bad_crc) + bytes(bad_kind))
    booted.stream.send(RESPONSE, 5, b"not for the agent")
    booted.stream.send(REQUEST, 6, b"\x00\x05{oops")
    assert client.wait_answer(6)[0] == 400
    booted.stream.send_raw(b"\x7fVM" + good)
    assert client.wait_answer(2)[0] == 200
    assert client.call("SysInfo")[0] == 200
    with pytest.raises(TimeoutError):
        booted.stream.next_frame(0.3)
    assert client.strays == []  # nothing for the corrupt ids 3 and 4


def test_reconnect_mid_frame_does_not_desynchronise(booted: Booted) -> None:
    """After the host hangs up mid-frame and reconnects, the next request alone is answered."""
    # A long frame: kept after the break, its missing half would swallow the next requests.
    half = booted.client.request_frame("Info", 7, b" " * 60000)
    booted.stream.send_raw(half[: len(half) // 2])
    booted.stream.close()
    stream = FrameStream(accept(booted.listener, 10))
    try:
        client = GuestApiClient(stream, first_id=50)
        assert client.call("Info")[0] == 200
        unanswered = client.request_frame("SysInfo", 60)
        stream.send_raw(unanswered)
        stream.close()  # the answer to 60 is lost, or comes late on the next connection
        stream = FrameStream(accept(booted.listener, 10))
        client = GuestApiClient(stream, first_id=70)
        assert client.call("NetworkInfo")[0] == 200
        assert set(client.strays) <= {60}
    finally:
        stream.close()


def test_shutdown_answers_null_then_reports_powering_off(booted: Booted) -> None:
    """Shutdown answers null first, then Notifies shutdown.progress "powering off"."""
    booted.host.wait_for("boot.progress", "done", timeout=10)
    assert booted.client.call("Shutdown") == (200, None)
    booted.host.wait_for("shutdown.progress", "powering off", timeout=10)
    assert booted.http("Shutdown") == (200, None)  # a second call is answered, nothing more
    booted.agent.wait_console("^vmm-guest: power off skipped", timeout=10)
    assert booted.host.notifications().count(("shutdown.progress", "powering off")) == 1


def test_reboot_keeps_the_instance_id_and_a_restart_does_not_report_boot_again(workdir: Path) -> None:
    """The seed on disk keeps the instance id across boots; a restart within a boot is silent."""
    share = workdir / "share"
    share.mkdir()
    (share / ".instance_info").write_text(json.dumps({"app_id": "0x" + APP_ID.upper()}))
    ids = []
    for boot in ("boot1", "boot2"):
        run = workdir / boot
        run.mkdir()
        (run / "state").symlink_to(workdir / "state", target_is_directory=True)
        (workdir / "state").mkdir(exist_ok=True)
        with running_agent(run, share=share) as agent:
            agent.wait_booted()
            ids.append(http_json(agent.api_port, "Info"))
    assert ids[0]["app_id"] == APP_ID
    assert ids[0]["instance_id"] == ids[1]["instance_id"] != ""
    seed = bytes.fromhex((workdir / "state" / "instance_id_seed").read_text())
    assert ids[0]["instance_id"] == hashlib.sha256(seed + bytes.fromhex(APP_ID)).hexdigest()[:40]

    # Same run dir as boot2: the agent was restarted within that boot.
    with running_agent(workdir / "boot2", share=share) as agent:
        agent.wait_console(r"^vmm-guest: up ")
        assert http_json(agent.api_port, "Info")["instance_id"] == ids[0]["instance_id"]
        assert "boot was already reported" in agent.console_text()
        assert BOOT_MARKER not in agent.console_text()


def http_json(port: int, method: str) -> Any:
    with urllib.request.urlopen(
        urllib.request.Request(f"http://127.0.0.1:{port}/api/{method}?json", data=b""), timeout=10
    ) as resp:
        return json.loads(resp.read())


class _DockerHandler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path != "/containers/json?all=1":
            self.send_error(404)
            return
        body = json.dumps(
            [
                {"Id": "c0ffee", "Names": ["/web"], "Image": "nginx:1", "ImageID": "sha256:ab",
                 "Created": 1700000000, "State": "running", "Status": "Up 2 minutes",
                 "Ports": []},
            ]
        ).encode()  # fmt: skip
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_list_containers_maps_the_docker_engine_listing(workdir: Path) -> None:
    """With a Docker socket, ListContainers maps Id, Names, Image, ImageID, Created, State, Status."""
    server = socketserver.UnixStreamServer(str(workdir / "docker.sock"), _DockerHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with running_agent(workdir, "--docker-socket", str(workdir / "docker.sock")) as agent:
            agent.wait_booted()
            assert http_json(agent.api_port, "ListContainers") == {
                "containers": [
                    {"id": "c0ffee", "names": ["/web"], "image": "nginx:1", "image_id": "sha256:ab",
                     "created": 1700000000, "state": "running", "status": "Up 2 minutes"},
                ]
            }  # fmt: skip
    finally:
        server.shutdown()
        server.server_close()


def test_a_failed_boot_step_reports_boot_error_and_no_done(workdir: Path) -> None:
    """When a service cannot start, boot.error names it and boot.progress never says "done"."""
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    host_listener = listen_unix(workdir / "host.sock")
    try:
        with HostApiPeer(lambda: accept(host_listener, 0.5)) as peer, running_agent(
            workdir, "--host-api-port", str(workdir / "host.sock"), "--http-port", str(port)
        ) as agent:  # fmt: skip
            agent.wait_booted()
            reason = peer.wait_for("boot.error", timeout=10)
            assert reason.startswith(f"http service on port {port}:")
            assert http_json(agent.api_port, "Info")["version"]  # the guest API still serves
            assert ("boot.progress", "done") not in peer.notifications()
    finally:
        busy.close()
        host_listener.close()
