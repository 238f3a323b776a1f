"""VM lifecycle on real QEMU (TCG) with the development image, driven over HTTP.

The lifecycle and the daemon-kill tests run once per backend: the QEMU backend (processes owned
by the supervisor) and the libvirt backend (domains of a private libvirtd that the tests start).
"""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from guest_agent import BOOT_MARKER
from tests.support import vm_ops
from tests.support.daemon_proc import DaemonProcess, start_daemon
from tests.support.guest_image import ensure_guest_image
from tests.support.libvirtd import Libvirtd, private_libvirtd
from tests.support.short_dirs import short_dir
from tests.support.vm_ops import free_port, rpc, vm_info

pytestmark = pytest.mark.qemu

BOOT_TIMEOUT = 120.0
COMPOSE = json.dumps({"manifest_version": 2, "name": "demo", "runner": "docker-compose",
                      "docker_compose_file": "services: {}\n"})


def wait_for(what: str, check: Callable[[], Any], timeout: float = BOOT_TIMEOUT) -> Any:
    """Boots under TCG are slow and noisy: a longer default wait than the support helper's."""
    return vm_ops.wait_for(what, check, timeout)


def serial_tail(client: httpx.Client, vm_id: str, lines: int = 400) -> str:
    response = client.get("/logs", params={"id": vm_id, "lines": lines})
    assert response.status_code == 200, response.text
    return response.text


def boots(client: httpx.Client, vm_id: str) -> int:
    """How many times the guest has printed the boot marker."""
    return serial_tail(client, vm_id).count(BOOT_MARKER)


@pytest.fixture(scope="module")
def image_dir() -> Path:
    return ensure_guest_image()


@pytest.fixture
def workdir() -> Iterator[Path]:
    with short_dir("vmml") as path:
        yield path


BACKENDS = ["qemu", "libvirt"]


@pytest.fixture(scope="module")
def libvirtd() -> Iterator[Libvirtd]:
    """One private libvirtd for the libvirt runs of this module (started only if they run)."""
    with private_libvirtd() as daemon:
        yield daemon


def backend_config(request: pytest.FixtureRequest, backend: str) -> tuple[str, str]:
    """The ([cvm] keys, extra sections) that select ``backend``."""
    if backend == "qemu":
        return 'backend = "qemu"', ""
    lvd: Libvirtd = request.getfixturevalue("libvirtd")
    return 'backend = "libvirt"', f'[libvirt]\nuri = "{lvd.uri}"\n'


def libvirt_domains(request: pytest.FixtureRequest) -> list[str]:
    """The names of every domain the test libvirtd has (defined or running)."""
    lvd: Libvirtd = request.getfixturevalue("libvirtd")
    out = subprocess.run(["virsh", "-c", lvd.uri, "list", "--all", "--name"], capture_output=True,
                         text=True, timeout=30, check=True).stdout
    return [line for line in out.split() if line]


def qemu_config(image_dir: Path, cvm: str = "", extra: str = "") -> str:
    """Config for real VMs: the dev image, TCG, port mapping on; ``cvm`` adds [cvm] keys."""
    return (
        f'[image]\npath = "{image_dir.parent}"\n'
        f'[cvm]\naccel = "tcg"\nshutdown_timeout = 60\n{cvm}\n'
        '[cvm.port_mapping]\nenabled = true\n'
        'range = [{protocol = "tcp", from = 1024, to = 65535}]\n' + extra
    )


@pytest.fixture
def daemon(workdir: Path, image_dir: Path) -> Iterator[DaemonProcess]:
    proc = start_daemon(workdir, extra_config=qemu_config(image_dir))
    try:
        yield proc
    finally:
        proc.destroy()


def create(client: httpx.Client, image: str, **fields: Any) -> str:
    body = {"name": "demo", "image": image, "compose_file": COMPOSE, "vcpu": 1,
            "memory": 512, "disk_size": 2} | fields
    vm_id: str = rpc(client, "CreateVm", body)["id"]
    return vm_id


def qemu_pids(workdir: Path) -> list[int]:
    return vm_ops.qemu_pids(workdir / "state")


@pytest.mark.parametrize("backend", BACKENDS)
def test_full_lifecycle(backend: str, request: pytest.FixtureRequest, image_dir: Path,
                        workdir: Path) -> None:
    """Create, boot, /guest, a port forward, Shutdown, Start, Stop, Resize, Update, Reload and
    Remove each do what they say, on real QEMU, with either backend."""
    cvm, extra = backend_config(request, backend)
    daemon = start_daemon(workdir, extra_config=qemu_config(image_dir, cvm, extra))
    try:
        with daemon.client() as client:
            vm_id = lifecycle(client, image_dir, workdir)
        if backend == "libvirt":
            assert f"vmm-{vm_id}" not in libvirt_domains(request)  # RemoveVm undefined it
    finally:
        daemon.destroy()


def guest_http(host_port: int) -> dict[str, Any] | None:
    """What the dev guest's HTTP service says of itself, through the port forward."""
    try:
        answer: dict[str, Any] = httpx.get(f"http://127.0.0.1:{host_port}/", timeout=5).json()
    except httpx.HTTPError:
        return None
    return answer


def lifecycle(client: httpx.Client, image_dir: Path, workdir: Path) -> str:
    host_port = free_port()
    vm_id = create(client, image_dir.name,
                   ports=[{"protocol": "tcp", "host_port": host_port, "vm_port": 8080}])
    vm_dir = workdir / "state" / "vm" / vm_id
    assert (vm_dir / "vm-manifest.json").is_file()
    assert json.loads((vm_dir / "vm-state.json").read_text()) == {"started": True}
    assert (vm_dir / "shared" / "app-compose.json").read_text() == COMPOSE

    wait_for("the boot marker", lambda: boots(client, vm_id) >= 1)
    wait_for("boot progress 'done'", lambda: vm_info(client, vm_id)["boot_progress"] == "done")
    info = vm_info(client, vm_id)
    assert info["status"] == "running"
    assert info["uptime"].endswith("s")
    assert info["configuration"]["ports"][0]["host_port"] == host_port
    assert info["image_version"] == "0.5.0"
    sysinfo = client.post("/guest/SysInfo?json", json={"id": vm_id})
    assert sysinfo.status_code == 200, sysinfo.text
    assert sysinfo.json()["num_cpus"] == 1

    # The guest's TCP service answers through the port mapping, with the compose we sent.
    answer = wait_for("the guest service", lambda: guest_http(host_port), timeout=60)
    assert answer["service"] == "vmm-guest"
    assert answer["compose_sha256"] == hashlib.sha256(COMPOSE.encode()).hexdigest()

    assert rpc(client, "ShutdownVm", {"id": vm_id}) is None
    wait_for("a graceful shutdown", lambda: vm_info(client, vm_id)["status"] == "stopped",
             timeout=60)
    # Which path ended the VM is recorded (the guest agent, or ACPI when it did not answer),
    # by the shutdown watcher, a moment after the status watcher saw QEMU gone.
    def graceful() -> bool:
        bodies = [e["body"] for e in vm_info(client, vm_id)["events"]
                  if e["event"] == "vmm.shutdown"]
        return any(b.startswith("graceful: the guest powered off (") for b in bodies)
    wait_for("the recorded shutdown outcome", graceful, timeout=30)
    assert qemu_pids(workdir) == []

    rpc(client, "StartVm", {"id": vm_id})
    # Each start rotates the logs ([cvm.log]): the first boot is in serial.log.1 now.
    wait_for("the second boot", lambda: boots(client, vm_id) >= 1)
    assert BOOT_MARKER in (vm_dir / "serial.log.1").read_text(errors="replace")
    assert vm_info(client, vm_id)["status"] == "running"

    rpc(client, "StopVm", {"id": vm_id})
    assert vm_info(client, vm_id)["status"] == "stopped"
    assert qemu_pids(workdir) == []
    assert json.loads((vm_dir / "vm-state.json").read_text()) == {"started": False}

    # Resized and updated while stopped: both apply at the next boot.
    rpc(client, "ResizeVm", {"id": vm_id, "vcpu": 2, "memory": 640, "disk_size": 3})
    new_compose = json.dumps({"manifest_version": 2, "name": "demo", "runner": "docker-compose",
                              "docker_compose_file": "services: {}\n# updated\n"})
    rpc(client, "UpdateVm", {"id": vm_id, "compose_file": new_compose})
    config = vm_info(client, vm_id)["configuration"]
    assert (config["vcpu"], config["memory"], config["disk_size"]) == (2, 640, 3)
    assert rpc(client, "ReloadVms") == {"loaded": 0, "updated": 0, "removed": 0}
    rpc(client, "StartVm", {"id": vm_id})
    wait_for("the updated guest service",
             lambda: (a := guest_http(host_port)) and a["compose_sha256"] ==
             hashlib.sha256(new_compose.encode()).hexdigest(), timeout=120)
    sysinfo = client.post("/guest/SysInfo?json", json={"id": vm_id}).json()
    assert sysinfo["num_cpus"] == 2

    rpc(client, "RemoveVm", {"id": vm_id})
    status = rpc(client, "Status", {"ids": [vm_id]})
    assert status["vms"] == [] or status["vms"][0]["status"] == "removing"
    wait_for("the VM to disappear",
             lambda: not rpc(client, "GetInfo", {"id": vm_id})["found"], timeout=60)
    assert not vm_dir.exists()
    assert qemu_pids(workdir) == []
    assert rpc(client, "Status")["total"] == 0
    return vm_id


@pytest.mark.parametrize("backend", BACKENDS)
def test_vm_survives_daemon_kill(backend: str, request: pytest.FixtureRequest, workdir: Path,
                                 image_dir: Path) -> None:
    """kill -9 of the daemon leaves VMs running; a new daemon adopts them unchanged."""
    cvm, extra = backend_config(request, backend)
    config = qemu_config(image_dir, cvm, extra)
    first = start_daemon(workdir, extra_config=config)
    second: DaemonProcess | None = None
    try:
        with first.client() as client:
            vm_id = create(client, image_dir.name)
            wait_for("the boot marker", lambda: boots(client, vm_id) >= 1)
            before = vm_info(client, vm_id)
        pids = qemu_pids(workdir)
        assert len(pids) == 1
        started_at = Path(f"/proc/{pids[0]}/stat").read_text().split()[21]

        first.kill()  # SIGKILL: no cleanup at all
        assert qemu_pids(workdir) == pids

        second = start_daemon(workdir, extra_config=config)
        with second.client() as client:
            after = vm_info(client, vm_id)
            assert after["status"] == "running"
            assert after["configuration"] == before["configuration"]
            assert qemu_pids(workdir) == pids  # nothing restarted
            assert Path(f"/proc/{pids[0]}/stat").read_text().split()[21] == started_at
            # Uptime continues from the original start, not from the adoption.
            assert seconds(after["uptime"]) >= seconds(before["uptime"])
            assert boots(client, vm_id) == 1
            events = [e["event"] for e in after["events"]]
            assert "vmm.adopted" in events

            # /logs on the new daemon follows the same VM: the guest's power-off line shows up live.
            with client.stream("GET", "/logs", params={"id": vm_id, "follow": "true",
                                                        "lines": 0}) as stream:
                rpc(client, "ShutdownVm", {"id": vm_id})
                seen = ""
                deadline = time.monotonic() + 60
                for chunk in stream.iter_text():
                    seen += chunk
                    if "powering off" in seen or time.monotonic() > deadline:
                        break
            assert "powering off" in seen
    finally:
        if second is not None:
            second.destroy()
        first.destroy()


def seconds(humantime: str) -> int:
    units = {"d": 86400, "h": 3600, "m": 60, "s": 1}
    return sum(int(part[:-1]) * units[part[-1]] for part in humantime.split())


def test_unloadable_directories_are_left_alone(workdir: Path, image_dir: Path) -> None:
    """At start, a work directory that cannot be parsed is logged and left untouched."""
    run = workdir / "state" / "vm"
    (run / "garbage-dir").mkdir(parents=True)
    (run / "garbage-dir" / "vm-manifest.json").write_text("{not json")
    (run / "not a vm id!").mkdir()
    (run / "stray-file").write_text("x")
    daemon = start_daemon(workdir, extra_config=qemu_config(image_dir))
    try:
        with daemon.client() as client:
            assert rpc(client, "Status")["total"] == 0
        log = daemon.log()
        assert "leaving " + str(run / "garbage-dir") + " untouched" in log
        assert (run / "garbage-dir" / "vm-manifest.json").read_text() == "{not json"
        assert (run / "not a vm id!").is_dir()
        assert (run / "stray-file").read_text() == "x"
    finally:
        daemon.destroy()


def test_failed_start_rolls_back_create(workdir: Path, image_dir: Path) -> None:
    """When the VM cannot start, CreateVm fails and leaves no work directory behind."""
    daemon = start_daemon(
        workdir, extra_config=qemu_config(image_dir, cvm='qemu_path = "/nonexistent/qemu"')
    )
    try:
        with daemon.client() as client:
            response = client.post("/prpc/CreateVm?json", json={
                "name": "x", "image": image_dir.name, "compose_file": COMPOSE,
                "vcpu": 1, "memory": 512, "disk_size": 2,
            })
            assert response.status_code == 503, response.text
            assert "cannot start VM" in response.json()["error"]
            assert rpc(client, "Status")["total"] == 0
        assert list((workdir / "state" / "vm").iterdir()) == []
    finally:
        daemon.destroy()


def test_port_conflicts(daemon: DaemonProcess, image_dir: Path) -> None:
    """A host port already mapped by another VM, or busy on the host, is refused clearly."""
    port = free_port()
    with daemon.client() as client:
        first = create(client, image_dir.name, stopped=True,
                       ports=[{"protocol": "tcp", "host_port": port, "vm_port": 8080}])
        response = client.post("/prpc/CreateVm?json", json={
            "name": "second", "image": image_dir.name, "compose_file": COMPOSE, "vcpu": 1,
            "memory": 512, "disk_size": 2, "stopped": True,
            "ports": [{"protocol": "tcp", "host_port": port, "vm_port": 80,
                       "host_address": "0.0.0.0"}],
        })
        assert response.status_code == 409
        assert first in response.json()["error"]
        assert "ports[0]" in response.json()["error"]
        # A port some other program holds: StartVm refuses instead of booting into a crash.
        with socket.socket() as squatter:
            squatter.bind(("127.0.0.1", port))
            squatter.listen()
            response = client.post("/prpc/StartVm?json", json={"id": first})
        assert response.status_code == 409
        assert "in use by another process" in response.json()["error"]
        assert rpc(client, "Status")["total"] == 1
