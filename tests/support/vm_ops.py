"""Helpers for tests that drive VMs through a real daemon: calls, waits, process lookups."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import populate_images
from tests.support.daemon_proc import DaemonProcess, start_daemon
from tests.support.idle_image import IDLE_IMAGE, make_idle_image

COMPOSE = json.dumps({"manifest_version": 2, "name": "demo", "runner": "docker-compose",
                      "docker_compose_file": "services: {}\n"})
FAKE_IMAGE = "dstack-dev-0.5.4"  # placeholder files: fine for VMs that never start


def compose(tag: str) -> str:
    return json.dumps({"manifest_version": 2, "name": f"demo-{tag}", "runner": "docker-compose",
                       "docker_compose_file": f"# {tag}\nservices: {{}}\n"})


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(what: str, check: Callable[[], Any], timeout: float = 60.0,
             interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def call(client: httpx.Client, method: str, body: dict[str, Any] | None = None) -> httpx.Response:
    return client.post(f"/prpc/{method}?json", json=body or {})


def rpc(client: httpx.Client, method: str, body: dict[str, Any] | None = None) -> Any:
    response = call(client, method, body)
    assert response.status_code == 200, f"{method}: {response.status_code} {response.text}"
    return response.json()


def error_of(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, f"{response.status_code} {response.text}"
    message: str = response.json()["error"]
    return message


def vm_info(client: httpx.Client, vm_id: str) -> dict[str, Any]:
    answer = rpc(client, "GetInfo", {"id": vm_id})
    assert answer["found"], vm_id
    info: dict[str, Any] = answer["info"]
    return info


def status_of(client: httpx.Client, vm_id: str) -> str:
    answer = rpc(client, "GetInfo", {"id": vm_id})
    return str(answer["info"]["status"]) if answer["found"] else "gone"


def events(info: dict[str, Any]) -> list[tuple[str, str]]:
    return [(e["event"], e["body"]) for e in info.get("events") or []]


def create(client: httpx.Client, image: str = IDLE_IMAGE, **fields: Any) -> str:
    body = {"name": "demo", "image": image, "compose_file": COMPOSE, "vcpu": 1,
            "memory": 64, "disk_size": 1} | fields
    vm_id: str = rpc(client, "CreateVm", body)["id"]
    return vm_id


def qemu_pids(state: Path) -> list[int]:
    """QEMU processes whose command line names this test's VM directory."""
    needle = str(state / "vm").encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if b"qemu-system" in cmdline and needle in cmdline \
                    and stat.rsplit(")", 1)[1].split()[0] != "Z":
                found.append(int(entry.name))
    return sorted(found)


def qemu_pid_of(vm_dir: Path) -> int | None:
    """The live QEMU of one VM (from qemu.pid), or None."""
    try:
        pid = int((vm_dir / "qemu.pid").read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    if b"qemu-system" not in cmdline or stat.rsplit(")", 1)[1].split()[0] == "Z":
        return None
    return pid


def qemu_argv(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")


def pid_gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def idle_config(cvm: str = "", extra: str = "") -> str:
    """TCG, the idle image next to the placeholder ones, port mapping on; ``cvm`` adds keys."""
    return (
        f'[cvm]\naccel = "tcg"\n{cvm}\n'
        '[cvm.port_mapping]\nenabled = true\n'
        'range = [{protocol = "tcp", from = 1024, to = 65535}]\n' + extra
    )


def prepare_images(workdir: Path) -> Path:
    images = workdir / "state" / "images"
    if not (images / IDLE_IMAGE).exists():
        populate_images(images)
        make_idle_image(images)
    return images


@contextmanager
def idle_daemon(workdir: Path, cvm: str = "", extra: str = "") -> Iterator[DaemonProcess]:
    prepare_images(workdir)
    daemon = start_daemon(workdir, extra_config=idle_config(cvm, extra))
    try:
        yield daemon
    finally:
        daemon.destroy()


def supervisor_processes(state: Path) -> dict[str, dict[str, Any]]:
    """The supervisor's table, read over its socket: id → ProcessInfo JSON."""
    transport = httpx.HTTPTransport(uds=str(state / "run" / "supervisor.sock"))
    with httpx.Client(transport=transport, base_url="http://supervisor", timeout=10) as client:
        data = client.get("/list").json()["data"]
    return {item["config"]["id"]: item for item in data}
