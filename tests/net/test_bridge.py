"""Bridge mode end to end: a real guest, dnsmasq with scripts/dhcp-notify, forwards in a netns.

The daemon (and so its supervisor, QEMU, the TAPs and the nft table) runs inside a namespace
the test makes, with a bridge and dnsmasq; the test talks to the daemon over its Unix socket
(a filesystem path, reachable from any namespace) and sends HTTP from inside the namespace.
Under the libvirt backend a private libvirtd runs in that namespace too: it makes the TAP.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.net.netns import add_bridge, end, netns, ns_run
from tests.support.daemon_proc import REPO_ROOT, DaemonProcess, start_daemon
from tests.support.guest_image import ensure_guest_image
from tests.support.libvirtd import Libvirtd, private_libvirtd
from tests.support.short_dirs import short_dir
from tests.support.vm_ops import qemu_pid_of, wait_for

pytestmark = pytest.mark.qemu

TOKEN = "bridge-test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
HOOK = REPO_ROOT / "scripts" / "dhcp-notify"
COMPOSE = json.dumps({"manifest_version": 2, "name": "demo", "runner": "docker-compose"})
BRIDGE_PORT, USER_PORT = 2080, 2081


@dataclass
class Net:
    ns: str
    workdir: Path
    image_dir: Path
    dnsmasq: subprocess.Popen[bytes]


@pytest.fixture
def net() -> Iterator[Net]:
    image_dir = ensure_guest_image()
    with short_dir("vmmb") as workdir, netns("vmmb") as ns:
        add_bridge(ns, "br0", "10.88.0.1/24")
        (workdir / "token").write_text(TOKEN + "\n")
        env = {"PATH": os.environ["PATH"], "VMM_SOCKET": str(workdir / "vmm.sock"),
               "VMM_TOKEN_FILE": str(workdir / "token")}  # fmt: skip
        dnsmasq = subprocess.Popen(
            ["ip", "netns", "exec", ns, "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null",
             "--interface=br0", "--bind-interfaces", "--port=0", "--user=root",
             "--dhcp-range=10.88.0.10,10.88.0.100,255.255.255.0,12h",
             "--dhcp-option=option:router,10.88.0.1", f"--dhcp-script={HOOK}",
             f"--dhcp-leasefile={workdir / 'leases'}", f"--pid-file={workdir / 'dnsmasq.pid'}",
             "--log-dhcp", f"--log-facility={workdir / 'dnsmasq.log'}"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            yield Net(ns, workdir, image_dir, dnsmasq)
        finally:
            end(dnsmasq)


def start(net: Net, forward: str, extra: str = "", cvm: str = "") -> DaemonProcess:
    config = extra + (
        f'[auth]\nenabled = true\ntokens = ["{TOKEN}"]\n'
        f'[image]\npath = "{net.image_dir.parent}"\n'
        f'[cvm]\naccel = "tcg"\nshutdown_timeout = 60\n{cvm}\n'
        f'[cvm.networking]\nbridge = "br0"\nforward = "{forward}"\n'
        '[cvm.port_mapping]\nenabled = true\nrange = [{protocol = "tcp", from = 1024, to = 65535}]\n'
    )
    return start_daemon(net.workdir, addresses=["unix:./vmm.sock"], extra_config=config,
                        wrap=["ip", "netns", "exec", net.ns])  # fmt: skip


def rpc(daemon: DaemonProcess, method: str, body: dict[str, Any]) -> Any:
    with daemon.unix_client(headers=AUTH) as client:
        response = client.post(f"/prpc/{method}", json=body)
    assert response.status_code == 200, response.text
    return response.json() if response.content else None


def nics(daemon: DaemonProcess, vm_id: str) -> list[dict[str, Any]]:
    return list(rpc(daemon, "Status", {"ids": [vm_id], "brief": True})["vms"][0]["interfaces"])


def host_nics(daemon: DaemonProcess, vm_id: str) -> list[dict[str, Any]] | None:
    """/guest/NetworkInfo's host_nics for the VM, or None while its agent does not answer."""
    with daemon.unix_client(headers=AUTH) as client:
        response = client.post("/guest/NetworkInfo?json", json={"id": vm_id})
    return list(response.json()["host_nics"]) if response.status_code == 200 else None


def guest_http(net: Net, port: int) -> dict[str, Any] | None:
    """The guest service's answer through host port ``port``, asked from inside the netns."""
    done = ns_run(net.ns, "curl", "-s", "-m", "5", f"http://127.0.0.1:{port}/", check=False)
    try:
        answer: dict[str, Any] = json.loads(done.stdout)
    except ValueError:
        return None
    return answer if answer.get("service") == "vmm-guest" else None


def listening(net: Net, port: int) -> bool:
    """Whether something in the netns listens on TCP ``port`` (the user-space forwarder)."""
    return bool(ns_run(net.ns, "ss", "-Hltn", f"sport = :{port}").stdout.strip())


def nft_rules(net: Net) -> str:
    return ns_run(net.ns, "nft", "list", "table", "ip", "vmm_forward", check=False).stdout


def hook(net: Net, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ["PATH"], "VMM_SOCKET": str(net.workdir / "vmm.sock"),
           "VMM_TOKEN": TOKEN}  # fmt: skip
    return subprocess.run(["python3", str(HOOK), *args], env=env, capture_output=True, text=True,
                          timeout=30, check=False)  # fmt: skip


def reached_both_ways(net: Net, daemon: DaemonProcess, vm_id: str,
                      ip: str) -> tuple[str, list[dict[str, Any]]]:
    """Wait until the guest answers through the bridge's nft forward and through the user NIC;
    return the DNAT rule (checked present) and /guest/NetworkInfo's host_nics."""
    wait_for("the guest through the bridge forward", lambda: guest_http(net, BRIDGE_PORT),
             timeout=120)  # fmt: skip
    rule = f"tcp dport {BRIDGE_PORT} dnat to {ip}:8080"
    assert rule in nft_rules(net)
    wait_for("the guest through the user NIC", lambda: guest_http(net, USER_PORT), timeout=60)
    listed: list[dict[str, Any]] = wait_for("/guest/NetworkInfo", lambda: host_nics(daemon, vm_id),
                                            timeout=60)  # fmt: skip
    return rule, listed


def boot_and_lease(net: Net, daemon: DaemonProcess, **fields: Any) -> tuple[str, str, str]:
    """Create and boot a VM; wait until dnsmasq's hook reported its bridge NIC's lease."""
    body = {"name": "br", "image": net.image_dir.name, "compose_file": COMPOSE, "vcpu": 1,
            "memory": 512, "disk_size": 2} | fields  # fmt: skip
    vm_id = str(rpc(daemon, "CreateVm", body)["id"])
    bridge_nic = next(n for n in nics(daemon, vm_id) if n["mode"] == "bridge")
    try:  # on failure, show what the guest and dnsmasq saw
        ip = wait_for("the bridge NIC's lease",
                      lambda: next(n for n in nics(daemon, vm_id) if n["mode"] == "bridge").get("ip"),
                      timeout=180)  # fmt: skip
    except TimeoutError:
        serial = net.workdir / "state" / "vm" / vm_id / "serial.log"
        print(serial.read_text(errors="replace")[-4000:])
        print((net.workdir / "dnsmasq.log").read_text(errors="replace")[-3000:])
        raise
    return vm_id, bridge_nic["mac"], str(ip)


def test_bridge_forward_through_nft_follows_leases_and_lifecycle(net: Net) -> None:
    """user + bridge NICs, each mapped; the bridge forward is nft DNAT to the leased IP, gone at
    stop, back at start, kept over a daemon restart, moved by a new lease, dropped by del; a
    removed VM's lease is ignored."""
    daemon = start(net, "nft")
    try:
        vm_id, mac, ip = boot_and_lease(net, daemon, networks=[{"mode": "bridge"}, {"mode": "user"}],
                                        ports=[{"protocol": "tcp", "host_port": USER_PORT,
                                                "vm_port": 8080, "nic": 1},
                                               {"protocol": "tcp", "host_port": BRIDGE_PORT,
                                                "vm_port": 8080, "nic": 0}])  # fmt: skip
        assert ip.startswith("10.88.0.")
        rule, listed = reached_both_ways(net, daemon, vm_id, ip)
        assert listed[0] == {"index": 0, "mode": "bridge", "mac": mac, "bridge": "br0", "ip": ip}
        assert listed[1]["mode"] == "user" and listed[1]["ip"] == ""

        rpc(daemon, "StopVm", {"id": vm_id})
        assert rule not in nft_rules(net)
        rpc(daemon, "StartVm", {"id": vm_id})
        assert rule in nft_rules(net)  # restored from the persisted lease at start

        daemon.stop()
        assert rule in nft_rules(net)  # the kernel keeps forwarding while the daemon is away
        daemon = start(net, "nft")
        assert rule in nft_rules(net)
        assert nics(daemon, vm_id)[0]["ip"] == ip
        wait_for("the guest after the restart", lambda: guest_http(net, BRIDGE_PORT), timeout=120)

        # A changed lease moves the forward (and a lease back moves it back).
        moved = "10.88.0.200"
        assert hook(net, "add", mac, moved).returncode == 0
        assert f"tcp dport {BRIDGE_PORT} dnat to {moved}:8080" in nft_rules(net)
        assert rule not in nft_rules(net)
        assert hook(net, "add", mac, ip).returncode == 0
        assert rule in nft_rules(net) and moved not in nft_rules(net)

        assert hook(net, "del", mac, ip).returncode == 0
        assert rule not in nft_rules(net)
        assert guest_http(net, BRIDGE_PORT) is None

        rpc(daemon, "RemoveVm", {"id": vm_id})
        wait_for("the removal", lambda: not rpc(daemon, "Status", {"ids": [vm_id]}).get("vms"))
        assert hook(net, "add", mac, ip).returncode == 0
        assert f"{mac} -> {ip} ignored: no VM has this MAC" in daemon.log()
        assert "dnat" not in nft_rules(net)
    finally:
        daemon.destroy()


def test_bridge_forward_in_user_space(net: Net) -> None:
    """With forward = userspace the mapped port reaches the guest with no nft table at all; the
    listener goes when QEMU dies by itself (seen by the watcher, no RPC involved)."""
    daemon = start(net, "userspace", extra="[cvm.auto_restart]\nenabled = false\n")
    try:
        vm_id, _mac, _ip = boot_and_lease(net, daemon, networks=[{"mode": "bridge"}],
                                          ports=[{"protocol": "tcp", "host_port": BRIDGE_PORT,
                                                  "vm_port": 8080}])  # fmt: skip
        wait_for("the guest through the user-space forward",
                 lambda: guest_http(net, BRIDGE_PORT), timeout=120)  # fmt: skip
        assert nft_rules(net) == ""
        assert listening(net, BRIDGE_PORT)
        pid = qemu_pid_of(net.workdir / "state" / "vm" / vm_id)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        wait_for("the listener to go with the VM", lambda: not listening(net, BRIDGE_PORT),
                 timeout=120)  # fmt: skip
        assert rpc(daemon, "Status", {"ids": [vm_id]})["vms"][0]["status"] == "exited"
    finally:
        daemon.destroy()
    assert not any(Path("/sys/class/net").glob("vt*n*"))  # no TAP reached the root namespace


def virsh(lvd: Libvirtd, *args: str) -> str:
    return subprocess.run(["virsh", "-c", lvd.uri, *args], capture_output=True, text=True,
                          timeout=30, check=True).stdout  # fmt: skip


def xml_attr(root: ET.Element, path: str, name: str) -> str:
    element = root.find(path)
    assert element is not None, f"no {path} in the domain XML"
    return element.get(name, "")


def root_macs() -> set[str]:
    """The MAC of every interface in the root namespace (where this test process runs)."""
    return {(p / "address").read_text().strip() for p in Path("/sys/class/net").iterdir()}


def test_bridge_forward_under_libvirt(net: Net) -> None:
    """libvirt backend, libvirtd in the netns, user + bridge NICs each mapped: the bridge NIC is
    a libvirt TAP on br0 with the VM's derived MAC, dnsmasq's lease is recorded, the mapped port
    reaches the guest through nft DNAT, StopVm drops the rule and the TAP, StartVm and a daemon
    restart (adopting the domain) keep it, RemoveVm drops it; nothing reaches the root netns."""
    tap_mac = ""
    with private_libvirtd(wrap=["ip", "netns", "exec", net.ns]) as lvd:
        libvirt = f'[libvirt]\nuri = "{lvd.uri}"\n'
        daemon = start(net, "nft", cvm='backend = "libvirt"', extra=libvirt)
        try:
            vm_id, mac, ip = boot_and_lease(net, daemon, networks=[{"mode": "user"}, {"mode": "bridge"}],
                                            ports=[{"protocol": "tcp", "host_port": USER_PORT,
                                                    "vm_port": 8080},
                                                   {"protocol": "tcp", "host_port": BRIDGE_PORT,
                                                    "vm_port": 8080, "nic": 1}])  # fmt: skip
            assert ip.startswith("10.88.0.")
            domain = ET.fromstring(virsh(lvd, "dumpxml", f"vmm-{vm_id}"))
            assert xml_attr(domain, "devices/interface[@type='bridge']/mac", "address") == mac
            assert xml_attr(domain, "devices/interface[@type='bridge']/source", "bridge") == "br0"
            tap = xml_attr(domain, "devices/interface[@type='bridge']/target", "dev")
            assert tap in ns_run(net.ns, "ip", "-o", "link", "show", "master", "br0").stdout
            tap_mac = ns_run(net.ns, "cat", f"/sys/class/net/{tap}/address").stdout.strip()

            rule, listed = reached_both_ways(net, daemon, vm_id, ip)
            assert listed[1] == {"index": 1, "mode": "bridge", "mac": mac, "bridge": "br0", "ip": ip}

            rpc(daemon, "StopVm", {"id": vm_id})
            assert rule not in nft_rules(net)
            assert guest_http(net, BRIDGE_PORT) is None
            wait_for("libvirt to delete the TAP", lambda: ns_run(
                net.ns, "ip", "link", "show", tap, check=False).returncode != 0, timeout=30)

            rpc(daemon, "StartVm", {"id": vm_id})
            assert rule in nft_rules(net)  # restored from the persisted lease at start
            daemon.stop()
            assert rule in nft_rules(net)
            daemon = start(net, "nft", cvm='backend = "libvirt"', extra=libvirt)
            assert rule in nft_rules(net)
            assert nics(daemon, vm_id)[1]["ip"] == ip
            assert "vmm.adopted" in [e["event"] for e in rpc(
                daemon, "Status", {"ids": [vm_id]})["vms"][0]["events"]]  # fmt: skip
            wait_for("the guest after the restart", lambda: guest_http(net, BRIDGE_PORT),
                     timeout=120)  # fmt: skip

            rpc(daemon, "RemoveVm", {"id": vm_id})
            wait_for("the removal", lambda: not rpc(daemon, "Status", {"ids": [vm_id]}).get("vms"))
            assert "dnat" not in nft_rules(net)
            assert f"vmm-{vm_id}" not in virsh(lvd, "list", "--all", "--name").split()
        finally:
            daemon.destroy()
    assert tap_mac and tap_mac not in root_macs()  # the TAP never reached the root namespace
    root_tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True,
                                 timeout=30, check=False).stdout  # fmt: skip
    assert "vmm_forward" not in root_tables
