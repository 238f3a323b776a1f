"""The nft transaction of bridge forwards (pure), and that nft takes it inside a private netns."""

from __future__ import annotations

import subprocess

from tests.net.netns import netns, ns_run
from vmm.net.forwards import Forward, nft_script

LOOPBACK = Forward("tcp", "127.0.0.1", 2080, "10.88.0.50", 8080, "br0", "vm1")
ANY = Forward("udp", "0.0.0.0", 2053, "10.88.0.51", 53, "br0", "vm2")
REMOTE = Forward("tcp", "192.0.2.7", 2443, "10.88.0.50", 443, "br0", "vm1")

EXPECTED = """table ip vmm_forward
delete table ip vmm_forward
table ip vmm_forward {
\tchain output {
\t\ttype nat hook output priority -100; policy accept;
\t\tip daddr 127.0.0.1 tcp dport 2080 dnat to 10.88.0.50:8080
\t\tfib daddr type local udp dport 2053 dnat to 10.88.0.51:53
\t\tip daddr 192.0.2.7 tcp dport 2443 dnat to 10.88.0.50:443
\t}
\tchain prerouting {
\t\ttype nat hook prerouting priority -100; policy accept;
\t\tfib daddr type local udp dport 2053 dnat to 10.88.0.51:53
\t\tip daddr 192.0.2.7 tcp dport 2443 dnat to 10.88.0.50:443
\t}
\tchain postrouting {
\t\ttype nat hook postrouting priority 100; policy accept;
\t\tip saddr 127.0.0.0/8 ip daddr 10.88.0.50 masquerade
\t\tip saddr 127.0.0.0/8 ip daddr 10.88.0.51 masquerade
\t}
}
"""


def test_nft_script_replaces_the_table_with_exactly_the_forwards() -> None:
    """Loopback forwards only in output (+ masquerade), others in prerouting too, one transaction."""
    assert nft_script([LOOPBACK, ANY, REMOTE]) == EXPECTED


def test_no_forwards_deletes_the_table() -> None:
    """An empty set leaves no table behind (created then deleted, so it works when absent)."""
    assert nft_script([]) == "table ip vmm_forward\ndelete table ip vmm_forward\n"


def test_nft_accepts_the_script_and_an_empty_set_removes_it() -> None:
    """Real nft in a private netns loads the rules, and the empty script removes the table."""
    with netns("vmmf") as ns:
        for script in (nft_script([LOOPBACK, ANY, REMOTE]), nft_script([LOOPBACK])):
            ns_run(ns, "nft", "-f", "-", input=script)
        listed = ns_run(ns, "nft", "list", "table", "ip", "vmm_forward").stdout
        assert "dnat to 10.88.0.50:8080" in listed and "10.88.0.51" not in listed
        ns_run(ns, "nft", "-f", "-", input=nft_script([]))
        gone = ns_run(ns, "nft", "list", "tables", check=False).stdout
        assert "vmm_forward" not in gone
    root = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, check=False)
    assert "vmm_forward" not in root.stdout  # nothing reached the root namespace
