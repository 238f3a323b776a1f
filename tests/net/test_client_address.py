"""Whose address the guest sees through a bridge port forward: nft DNAT keeps a remote client's.

Three namespaces made by the test, no QEMU (the forward is the subject, not the VM):

    client (192.0.2.2) --veth-- host (192.0.2.1; br0 10.88.0.1/24) --br0 port-- guest (10.88.0.50)

The host namespace gets the daemon's own forwarders (``vmm.net.forwards.NftForwarder`` and
``vmm.net.proxy.UserspaceForwarder``, run there in a child process); the stand-in guest runs a
TCP service that answers each connection with the peer address it sees.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.net.netns import end, netns, ns_run
from tests.support.daemon_proc import checkout_env

GUEST_IP, HOST_BRIDGE_IP, HOST_IP, CLIENT_IP = "10.88.0.50", "10.88.0.1", "192.0.2.1", "192.0.2.2"
PEER_PORT = 9000  # the guest's service
NFT_PORT, USERSPACE_PORT = 2080, 2081
TIMEOUT = 30

# The stand-in guest: each connection is answered with the address it came from, then closed.
PEER_SERVER = f"""
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("{GUEST_IP}", {PEER_PORT})); s.listen(16)
print("ready", flush=True)
while True:
    c, peer = s.accept(); c.sendall(peer[0].encode()); c.close()
"""

# Runs in the host namespace: apply the given forwards with the daemon's code, log to stderr.
APPLY_NFT = """
import asyncio, json, logging, sys
from vmm.net.forwards import Forward, NftForwarder
logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(message)s")
asyncio.run(NftForwarder().apply([Forward(*f) for f in json.loads(sys.argv[1])]))
"""

# Runs in the host namespace until its stdin closes: the user-space forwarder.
SERVE_USERSPACE = """
import asyncio, json, sys
from vmm.net.forwards import Forward
from vmm.net.proxy import UserspaceForwarder
async def main():
    proxy = UserspaceForwarder()
    await proxy.apply([Forward(*f) for f in json.loads(sys.argv[1])])
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await proxy.close()
asyncio.run(main())
"""

# Runs in any namespace: connect, print what the guest said (the address it saw).
ASK = """
import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10) as conn:
    print(conn.recv(64).decode())
"""


@dataclass
class Topology:
    host: str
    guest: str
    client: str


def forward(port: int, address: str = "0.0.0.0") -> list[object]:
    """One Forward's fields (protocol, address, host_port, guest_ip, vm_port, bridge, vm_id)."""
    return ["tcp", address, port, GUEST_IP, PEER_PORT, "br0", "vm1"]


def seen_by_guest(ns: str, address: str, port: int) -> str:
    """The client address the guest's service reports for a connection made from ``ns``."""
    return ns_run(ns, sys.executable, "-c", ASK, address, str(port)).stdout.strip()


def apply_nft(topo: Topology, forwards: list[list[object]]) -> str:
    """Apply ``forwards`` with NftForwarder in the host namespace; its log (stderr)."""
    done = subprocess.run(["ip", "netns", "exec", topo.host, sys.executable, "-c", APPLY_NFT,
                           json.dumps(forwards)], capture_output=True, text=True,
                          timeout=TIMEOUT, env=checkout_env(), check=True)  # fmt: skip
    return done.stderr


@pytest.fixture
def topo() -> Iterator[Topology]:
    with netns("vmmch") as host, netns("vmmcg") as guest, netns("vmmcc") as client:
        for cmd in (
            [host, "ip", "link", "add", "br0", "type", "bridge"],
            [host, "ip", "addr", "add", f"{HOST_BRIDGE_IP}/24", "dev", "br0"],
            [host, "ip", "link", "set", "br0", "up"],
            [host, "ip", "link", "add", "vg", "type", "veth", "peer", "name", "eth0", "netns", guest],
            [host, "ip", "link", "set", "vg", "master", "br0", "up"],
            [guest, "ip", "addr", "add", f"{GUEST_IP}/24", "dev", "eth0"],
            [guest, "ip", "link", "set", "eth0", "up"],
            [guest, "ip", "route", "add", "default", "via", HOST_BRIDGE_IP],
            [host, "ip", "link", "add", "vc", "type", "veth", "peer", "name", "eth0", "netns", client],
            [host, "ip", "addr", "add", f"{HOST_IP}/24", "dev", "vc"],
            [host, "ip", "link", "set", "vc", "up"],
            [client, "ip", "addr", "add", f"{CLIENT_IP}/24", "dev", "eth0"],
            [client, "ip", "link", "set", "eth0", "up"],
            [client, "ip", "route", "add", "10.88.0.0/24", "via", HOST_IP],  # for the direct path
        ):  # fmt: skip
            ns_run(*cmd)
        server = subprocess.Popen(["ip", "netns", "exec", guest, sys.executable, "-c", PEER_SERVER],
                                  stdout=subprocess.PIPE)  # fmt: skip
        try:
            assert server.stdout is not None and server.stdout.readline().strip() == b"ready"
            yield Topology(host, guest, client)
        finally:
            end(server)
            if server.stdout is not None:
                server.stdout.close()


def test_nft_dnat_keeps_a_remote_clients_address(topo: Topology) -> None:
    """Through NftForwarder's DNAT the guest sees the remote client's own IP; a host-local client
    of 127.0.0.1 is masqueraded to the bridge address; with ip_forward off the daemon warns."""
    ns_run(topo.host, "sysctl", "-qw", "net.ipv4.ip_forward=0")
    log = apply_nft(topo, [forward(NFT_PORT)])
    assert "net.ipv4.ip_forward is 0: remote clients cannot reach 1 port forwards" in log

    ns_run(topo.host, "sysctl", "-qw", "net.ipv4.ip_forward=1")
    assert "ip_forward" not in apply_nft(topo, [forward(NFT_PORT)])
    assert seen_by_guest(topo.client, HOST_IP, NFT_PORT) == CLIENT_IP
    assert seen_by_guest(topo.host, "127.0.0.1", NFT_PORT) == HOST_BRIDGE_IP  # by design
    assert seen_by_guest(topo.client, GUEST_IP, PEER_PORT) == CLIENT_IP  # direct, for reference

    ns_run(topo.host, "sysctl", "-qw", "net.ipv4.ip_forward=0")
    assert "ip_forward" not in apply_nft(topo, [forward(NFT_PORT, "127.0.0.1")])  # none remote


def test_userspace_forwarder_shows_the_host_as_the_client(topo: Topology) -> None:
    """The user-space fallback cannot keep the address: the guest sees the host's bridge IP
    for a remote client (as README says), and no routing is needed for it."""
    ns_run(topo.host, "sysctl", "-qw", "net.ipv4.ip_forward=0")
    proxy = subprocess.Popen(["ip", "netns", "exec", topo.host, sys.executable, "-c",
                              SERVE_USERSPACE, json.dumps([forward(USERSPACE_PORT)])],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             env=checkout_env())  # fmt: skip
    try:
        assert proxy.stdout is not None and proxy.stdout.readline().strip() == b"ready"
        assert seen_by_guest(topo.client, HOST_IP, USERSPACE_PORT) == HOST_BRIDGE_IP
    finally:
        if proxy.stdin is not None:
            proxy.stdin.close()
        end(proxy)
        if proxy.stdout is not None:
            proxy.stdout.close()
