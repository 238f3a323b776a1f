"""dnsmasq with scripts/dhcp-notify as its hook keeps serving leases while the daemon is down.

Real dnsmasq on a bridge in a namespace the test makes, real DHCP clients (busybox udhcpc) in a
second namespace on veth pairs. The daemon's socket is first missing, then held by a listener
that accepts and never answers (a hung daemon): either way every client still gets its lease,
dnsmasq keeps running, and the hook did reach the socket.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

from tests.net.netns import add_bridge, end, netns, ns_run
from tests.support.daemon_proc import REPO_ROOT
from tests.support.short_dirs import short_dir
from tests.support.vm_ops import wait_for

HOOK = REPO_ROOT / "scripts" / "dhcp-notify"
CLIENTS = 3


@contextlib.contextmanager
def hung_daemon(path: Path) -> Iterator[list[socket.socket]]:
    """A Unix socket that accepts every connection and never answers; yields what it accepted."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(16)
    listener.settimeout(0.2)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                accepted.append(listener.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield accepted
    finally:
        stop.set()
        thread.join(timeout=5)
        for conn in accepted:
            conn.close()
        listener.close()


def add_client(server_ns: str, client_ns: str, index: int) -> str:
    """A veth pair: one end on the server's bridge, the other (returned) in the client's ns."""
    host_end, client_end = f"vh{index}", f"vc{index}"
    ns_run(server_ns, "ip", "link", "add", host_end, "type", "veth", "peer", "name", client_end)
    ns_run(server_ns, "ip", "link", "set", client_end, "netns", client_ns)
    ns_run(server_ns, "ip", "link", "set", host_end, "master", "br0", "up")
    ns_run(client_ns, "ip", "link", "set", client_end, "up")
    return client_end


def lease(client_ns: str, interface: str) -> str:
    """Ask for a lease once (udhcpc -n -q) and return the address offered; fail if none came."""
    done = ns_run(client_ns, "busybox", "udhcpc", "-i", interface, "-n", "-q", "-t", "5", "-T",
                  "2", "-s", "/bin/true", check=False, timeout=30)  # fmt: skip
    assert done.returncode == 0, done.stderr
    for line in done.stderr.splitlines():
        if "obtained" in line:  # "udhcpc: lease of 10.89.0.23 obtained from 10.89.0.1, ..."
            return line.split("lease of ", 1)[1].split()[0]
    raise AssertionError(f"no lease in udhcpc's output: {done.stderr}")


def test_dnsmasq_carries_on_when_the_daemon_is_missing_or_hung() -> None:
    """Every client gets a lease while the hook's daemon is missing, then while it hangs."""
    with short_dir("vmmd") as workdir, netns("vmmds") as server, netns("vmmdc") as clients:
        add_bridge(server, "br0", "10.89.0.1/24")
        sock = workdir / "vmm.sock"
        env = {"PATH": os.environ["PATH"], "VMM_SOCKET": str(sock), "VMM_TOKEN": "t",
               "VMM_HOOK_TIMEOUT": "2"}  # fmt: skip
        dnsmasq = subprocess.Popen(
            ["ip", "netns", "exec", server, "dnsmasq", "--keep-in-foreground",
             "--conf-file=/dev/null", "--interface=br0", "--bind-interfaces", "--port=0",
             "--user=root", "--dhcp-range=10.89.0.10,10.89.0.100,255.255.255.0,12h",
             f"--dhcp-script={HOOK}", f"--dhcp-leasefile={workdir / 'leases'}",
             f"--pid-file={workdir / 'dnsmasq.pid'}", f"--log-facility={workdir / 'dnsmasq.log'}"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            interfaces = [add_client(server, clients, i) for i in range(CLIENTS * 2)]
            # The daemon is down: no socket at all.
            missing = {lease(clients, iface) for iface in interfaces[:CLIENTS]}
            assert len(missing) == CLIENTS
            # A hung daemon: the hook connects and waits out its timeout each time.
            with hung_daemon(sock) as accepted:
                hung = {lease(clients, iface) for iface in interfaces[CLIENTS:]}
                assert len(hung) == CLIENTS and not hung & missing
                wait_for("the hook to reach the hung daemon", lambda: accepted, timeout=30)
            assert dnsmasq.poll() is None, "dnsmasq stopped"
            leases = (workdir / "leases").read_text()
            assert all(ip in leases for ip in missing | hung)
        finally:
            end(dnsmasq)
