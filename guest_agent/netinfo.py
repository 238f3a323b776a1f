"""GuestApi.NetworkInfo: DNS servers, default gateways, interfaces with addresses and counters.

Addresses come from an rtnetlink RTM_GETADDR dump (stdlib sockets): it is what ``ip addr``
reads, it lists every IPv4 and IPv6 address with its prefix length, and the image's busybox
``ip`` has no JSON output to parse instead. Counters come from /sys/class/net/*/statistics.
"""

import socket
import struct
from pathlib import Path

RESOLV_CONF = Path("/etc/resolv.conf")
PROC_NET = Path("/proc/net")
SYS_NET = Path("/sys/class/net")

NETLINK_ROUTE = 0
RTM_NEWADDR = 20
RTM_GETADDR = 22
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
IFA_ADDRESS = 1
IFA_LOCAL = 2
RTF_UP = 0x1
RTF_GATEWAY = 0x2
NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
IFADDRMSG = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index
RTATTR = struct.Struct("=HH")  # len, type
COUNTERS = ("rx_bytes", "tx_bytes", "rx_errors", "tx_errors")


def dns_servers(text: str) -> list[str]:
    servers: list[str] = []
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if len(words) >= 2 and words[0] == "nameserver" and words[1] not in servers:
            servers.append(words[1])
    return servers


def ipv4_gateways(route_text: str) -> list[str]:
    """Next hops of the default routes in /proc/net/route (hex, host byte order: little-endian)."""
    gateways: list[str] = []
    for line in route_text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 8:
            continue
        try:
            dest, gateway, flags, mask = (int(fields[i], 16) for i in (1, 2, 3, 7))
        except ValueError:
            continue
        if dest == 0 and mask == 0 and flags & RTF_GATEWAY and flags & RTF_UP:
            address = socket.inet_ntoa(struct.pack("<I", gateway))
            if address not in gateways:
                gateways.append(address)
    return gateways


def ipv6_gateways(route_text: str) -> list[str]:
    """Next hops of the ::/0 routes in /proc/net/ipv6_route."""
    gateways: list[str] = []
    for line in route_text.splitlines():
        fields = line.split()
        if len(fields) < 10:
            continue
        dest, prefix, next_hop, flags = fields[0], fields[1], fields[4], fields[8]
        try:
            if int(dest, 16) or int(prefix, 16) or not int(next_hop, 16):
                continue
            if not int(flags, 16) & RTF_UP:
                continue
            address = socket.inet_ntop(socket.AF_INET6, bytes.fromhex(next_hop))
        except ValueError:
            continue
        if address not in gateways:
            gateways.append(address)
    return gateways


def parse_addr_dump(data: bytes) -> tuple[list[tuple[int, str, int]], bool]:
    """(ifindex, address, prefix) from RTM_NEWADDR messages, and whether NLMSG_DONE was seen."""
    found: list[tuple[int, str, int]] = []
    offset = 0
    while offset + NLMSGHDR.size <= len(data):
        length, msg_type, _flags, _seq, _pid = NLMSGHDR.unpack_from(data, offset)
        if length < NLMSGHDR.size or offset + length > len(data):
            break
        if msg_type == NLMSG_DONE:
            return found, True
        if msg_type == NLMSG_ERROR:
            (errno,) = struct.unpack_from("=i", data, offset + NLMSGHDR.size)
            raise OSError(-errno, "rtnetlink RTM_GETADDR failed")
        if msg_type == RTM_NEWADDR:
            body = offset + NLMSGHDR.size
            family, prefix, _f, _scope, index = IFADDRMSG.unpack_from(data, body)
            attrs: dict[int, bytes] = {}
            pos, end = body + IFADDRMSG.size, offset + length
            while pos + RTATTR.size <= end:
                attr_len, attr_type = RTATTR.unpack_from(data, pos)
                if attr_len < RTATTR.size:
                    break
                attrs[attr_type] = data[pos + RTATTR.size : pos + attr_len]
                pos += (attr_len + 3) & ~3
            # For point-to-point links IFA_ADDRESS is the peer; IFA_LOCAL is ours.
            raw = attrs.get(IFA_LOCAL) or attrs.get(IFA_ADDRESS)
            if raw and family in (socket.AF_INET, socket.AF_INET6):
                found.append((index, socket.inet_ntop(family, raw), prefix))
        offset += (length + 3) & ~3
    return found, False


def addresses_by_index(timeout: float = 2.0) -> dict[int, list[dict[str, object]]]:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
    try:
        sock.settimeout(timeout)
        sock.bind((0, 0))
        request = NLMSGHDR.pack(
            NLMSGHDR.size + IFADDRMSG.size, RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP, 1, 0
        ) + IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
        sock.sendto(request, (0, 0))
        result: dict[int, list[dict[str, object]]] = {}
        done = False
        while not done:
            found, done = parse_addr_dump(sock.recv(65536))
            for index, address, prefix in found:
                result.setdefault(index, []).append({"address": address, "prefix": prefix})
        return result
    finally:
        sock.close()


def _read_int(path: Path) -> int:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return 0


def interfaces(sys_net: Path = SYS_NET) -> list[dict[str, object]]:
    try:
        addresses = addresses_by_index()
    except OSError:
        addresses = {}
    found: list[tuple[int, dict[str, object]]] = []
    try:
        entries = list(sys_net.iterdir())
    except OSError:
        entries = []
    for entry in entries:
        index = _read_int(entry / "ifindex")
        item: dict[str, object] = {"name": entry.name, "addresses": addresses.get(index, [])}
        for counter in COUNTERS:
            item[counter] = _read_int(entry / "statistics" / counter)
        found.append((index, item))
    return [item for _index, item in sorted(found, key=lambda pair: pair[0])]


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def network_info() -> dict[str, object]:
    gateways = ipv4_gateways(_read(PROC_NET / "route")) + ipv6_gateways(_read(PROC_NET / "ipv6_route"))
    return {
        "dns_servers": dns_servers(_read(RESOLV_CONF)),
        "gateways": [{"address": address} for address in gateways],
        "interfaces": interfaces(),
        "wg_info": "",
    }
