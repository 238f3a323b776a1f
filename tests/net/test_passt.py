"""passt mode end to end in a private netns, and what refuses it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from tests.backend.libvirt.cases import dev_case
from tests.net.netns import add_bridge, netns, ns_run
from tests.net.test_bridge import AUTH, COMPOSE, TOKEN
from tests.support.daemon_proc import DaemonProcess, start_daemon
from tests.support.guest_image import ensure_guest_image
from tests.support.short_dirs import short_dir
from tests.support.vm_ops import pid_gone, supervisor_processes, wait_for
from vmm.backend.libvirt.support import unsupported_features
from vmm.model.manifest import Network, PortMap
from vmm.net.nics import resolve_networks
from vmm.net.passt import passt_argv

PORT = 2090


def test_passt_argv_has_one_spec_per_mapping_and_no_flag_debian_refuses() -> None:
    """-t/-u addr/host:vm per mapping; never --map-host-loopback/--map-guest-addr or -1."""
    spec, config = dev_case()
    manifest = spec.manifest.evolve(networks=(Network("passt"),), port_map=(
        PortMap("tcp", 2090, 8080, "127.0.0.1"), PortMap("udp", 2053, 53, "0.0.0.0")))
    nic = resolve_networks(manifest, config.cvm.networking)[0]
    argv = passt_argv("/usr/bin/passt", Path("/run/vm/x"), nic)
    assert argv == ["/usr/bin/passt", "--socket", "/run/vm/x/passt/passt.sock", "--log-file",
                    "/run/vm/x/passt.log", "-f", "-t", "127.0.0.1/2090:8080",
                    "-u", "0.0.0.0/2053:53"]  # fmt: skip


def test_libvirt_refuses_passt_naming_the_nic() -> None:
    """Debian's libvirt 9.0 has no passt: the NIC is named in the refusal."""
    spec, config = dev_case()
    spec = replace(spec, manifest=spec.manifest.evolve(networks=(Network("user"), Network("passt"))))
    problems = unsupported_features(spec, config, (9, 0, 0))
    assert any(p.startswith("networks[1]: passt networking") for p in problems), problems


def config_for(image_dir: Path) -> str:
    return (
        f'[auth]\nenabled = true\ntokens = ["{TOKEN}"]\n'
        f'[image]\npath = "{image_dir.parent}"\n[cvm]\naccel = "tcg"\n'
        '[cvm.port_mapping]\nenabled = true\nrange = [{protocol = "tcp", from = 1024, to = 65535}]\n'
    )


@pytest.fixture
def ns_dir() -> Iterator[tuple[str, Path]]:
    with short_dir("vmmp") as workdir, netns("vmmp") as ns:
        add_bridge(ns, "br0", "10.88.0.1/24")
        # passt copies the host's addresses and needs a default route to pick its interface.
        ns_run(ns, "ip", "route", "add", "default", "via", "10.88.0.254", "dev", "br0")
        yield ns, workdir


def rpc(daemon: DaemonProcess, method: str, body: dict[str, Any]) -> Any:
    with daemon.unix_client(headers=AUTH) as client:
        response = client.post(f"/prpc/{method}", json=body)
    assert response.status_code == 200, response.text
    return response.json() if response.content else None


def guest_http(ns: str) -> dict[str, Any] | None:
    done = ns_run(ns, "curl", "-s", "-m", "5", f"http://127.0.0.1:{PORT}/", check=False)
    try:
        answer: dict[str, Any] = json.loads(done.stdout)
    except ValueError:
        return None
    return answer if answer.get("service") == "vmm-guest" else None


@pytest.mark.qemu
def test_passt_forward_reaches_the_guest_and_passt_lives_with_the_vm(
    ns_dir: tuple[str, Path],
) -> None:
    """The guest's service answers through passt's -t forward; passt is adopted over a daemon
    restart, stopped with the VM and removed with it."""
    ns, workdir = ns_dir
    image_dir = ensure_guest_image()
    state = workdir / "state"

    def start() -> DaemonProcess:
        return start_daemon(workdir, addresses=["unix:./vmm.sock"],
                            extra_config=config_for(image_dir),
                            wrap=["ip", "netns", "exec", ns])  # fmt: skip

    daemon = start()
    try:
        body = {"name": "pt", "image": image_dir.name, "compose_file": COMPOSE, "vcpu": 1,
                "memory": 512, "disk_size": 2, "networks": [{"mode": "passt"}],
                "ports": [{"protocol": "tcp", "host_port": PORT, "vm_port": 8080}]}  # fmt: skip
        vm_id = rpc(daemon, "CreateVm", body)["id"]
        passt_id = f"passt-{vm_id}"
        nic = rpc(daemon, "Status", {"ids": [vm_id]})["vms"][0]["interfaces"][0]
        assert (nic["mode"], nic["backend"]) == ("passt", "passt")
        wait_for("the guest through passt", lambda: guest_http(ns), timeout=180)
        note = json.loads(supervisor_processes(state)[passt_id]["config"]["note"])
        assert note == {"kind": "passt", "live_for": vm_id}

        daemon.stop()
        daemon = start()
        assert guest_http(ns) is not None  # VM and passt ran on; the daemon adopted the VM
        pid = supervisor_processes(state)[passt_id]["state"]["pid"]

        rpc(daemon, "StopVm", {"id": vm_id})
        assert supervisor_processes(state)[passt_id]["state"]["status"] != "running"
        wait_for("passt's exit", lambda: pid_gone(pid), timeout=30)
        rpc(daemon, "RemoveVm", {"id": vm_id})
        wait_for("the removal", lambda: passt_id not in supervisor_processes(state), timeout=60)
    finally:
        daemon.destroy()  # ends QEMU, passt and the supervisor by PID
