"""guest_agent.sysinfo and netinfo: parsing /proc, /sys, os-release and rtnetlink answers."""

import json
import shutil
import socket
import struct
import subprocess

import pytest

from guest_agent import netinfo, sysinfo


def test_cpu_lists_and_meminfo_parse_to_counts_and_bytes() -> None:
    """CPU lists count ranges; meminfo kB values become bytes, unitless values stay."""
    assert sysinfo.parse_cpu_list("0-3,6\n") == 5
    assert sysinfo.parse_cpu_list("0") == 1
    mem = sysinfo.parse_meminfo("MemTotal:  1000 kB\nHugePages_Total:   4\nbad line\n")
    assert mem == {"MemTotal": 1024000, "HugePages_Total": 4}


def test_os_release_quotes_and_cpu_model() -> None:
    """os-release values are unquoted; the CPU model is the first "model name"."""
    fields = sysinfo.parse_os_release('NAME="Debian GNU/Linux"\nVERSION_ID="12"\n# c\nID=debian\n')
    assert fields == {"NAME": "Debian GNU/Linux", "VERSION_ID": "12", "ID": "debian"}
    cpuinfo = "processor\t: 0\nmodel name\t: QEMU Virtual CPU\n\nprocessor\t: 1\nmodel name\t: X\n"
    assert sysinfo.cpu_model(cpuinfo) == "QEMU Virtual CPU"


def test_block_mounts_keep_block_devices_once_per_mount_point() -> None:
    """Only /dev-backed mounts count, escapes are undone, a mount point is listed once."""
    mounts = (
        "/dev/root / ext4 rw 0 0\n"
        "proc /proc proc rw 0 0\n"
        "devtmpfs /dev devtmpfs rw 0 0\n"
        "/dev/null /x tmpfs rw 0 0\n"
        "/dev/nonexistent-vdb /data\\040disk ext4 rw 0 0\n"
        "/dev/nonexistent-vdc / ext4 rw 0 0\n"
    )
    assert sysinfo.block_mounts(mounts) == [("/dev/root", "/"), ("/dev/nonexistent-vdb", "/data disk")]


def test_default_gateways_and_dns_servers() -> None:
    """Default routes give gateways (IPv4 little-endian hex, IPv6 ::/0); resolv.conf gives DNS."""
    route = (
        "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"
        "eth0\t00000000\t0202000A\t0003\t0\t0\t0\t00000000\t0\t0\t0\n"
        "eth0\t0002000A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n"
    )
    assert netinfo.ipv4_gateways(route) == ["10.0.2.2"]
    v6 = (
        "00000000000000000000000000000000 00 00000000000000000000000000000000 00 "
        "fe800000000000000000000000000001 00000400 00000000 00000000 00000003 eth0\n"
        "fd000000000000000000000000000000 40 00000000000000000000000000000000 00 "
        "00000000000000000000000000000000 00000100 00000000 00000000 00000001 eth0\n"
    )
    assert netinfo.ipv6_gateways(v6) == ["fe80::1"]
    resolv = "# x\nnameserver 10.0.2.3\nnameserver 1.1.1.1 # c\nsearch lan\nnameserver 10.0.2.3\n"
    assert netinfo.dns_servers(resolv) == ["10.0.2.3", "1.1.1.1"]


def _addr_message(index: int, family: int, prefix: int, attrs: list[tuple[int, bytes]]) -> bytes:
    body = netinfo.IFADDRMSG.pack(family, prefix, 0, 0, index)
    for kind, value in attrs:
        attr = netinfo.RTATTR.pack(netinfo.RTATTR.size + len(value), kind) + value
        body += attr + b"\0" * (-len(attr) % 4)
    return netinfo.NLMSGHDR.pack(netinfo.NLMSGHDR.size + len(body), netinfo.RTM_NEWADDR, 2, 1, 0) + body


def test_rtnetlink_dump_parses_local_addresses_and_prefixes() -> None:
    """IFA_LOCAL wins over IFA_ADDRESS (point-to-point peers); IPv6 uses IFA_ADDRESS."""
    v4 = _addr_message(
        2, socket.AF_INET, 24,
        [(netinfo.IFA_ADDRESS, bytes([10, 0, 2, 1])), (netinfo.IFA_LOCAL, bytes([10, 0, 2, 15]))],
    )  # fmt: skip
    v6 = _addr_message(
        1, socket.AF_INET6, 128, [(netinfo.IFA_ADDRESS, socket.inet_pton(socket.AF_INET6, "::1"))]
    )
    done = netinfo.NLMSGHDR.pack(20, netinfo.NLMSG_DONE, 2, 1, 0) + b"\0" * 4
    found, finished = netinfo.parse_addr_dump(v4 + v6)
    assert (found, finished) == ([(2, "10.0.2.15", 24), (1, "::1", 128)], False)
    assert netinfo.parse_addr_dump(done) == ([], True)
    error = netinfo.NLMSGHDR.pack(20, netinfo.NLMSG_ERROR, 0, 1, 0) + struct.pack("=i", -1)
    with pytest.raises(OSError):
        netinfo.parse_addr_dump(error)


def test_interface_addresses_match_iproute2() -> None:
    """The netlink dump lists the same addresses as `ip -j addr` on this machine."""
    ip = shutil.which("ip")
    if ip is None:
        pytest.skip("iproute2 is not installed")
    out = subprocess.run([ip, "-j", "addr"], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        pytest.skip("this ip has no JSON output")
    expected = {
        link["ifname"]: sorted((a["local"], a["prefixlen"]) for a in link.get("addr_info", []))
        for link in json.loads(out.stdout)
    }
    got = {}
    for iface in netinfo.interfaces():
        addresses = iface["addresses"]
        assert isinstance(addresses, list)
        got[iface["name"]] = sorted((a["address"], a["prefix"]) for a in addresses)
    assert got == expected
