"""Port forwards of bridge-mode NICs: host port -> the NIC's leased IP, while the VM runs.

The forwards in force are always recomputed as a whole from the registry (``desired``): running
VMs, their bridge NICs, the mappings placed on them and the leases the daemon holds. A lease
that changes, a VM that starts, stops or goes, and a daemon start each call ``apply`` with the
new whole; nothing is patched, so nothing stale survives (dstack's forwarder kept a destroyed
VM's rule, reference §11).

Two ways to carry them:
- ``NftForwarder``: nftables DNAT in the daemon's own table, replaced in one transaction. The
  kernel forwards, so a remote client's address reaches the guest unchanged. Traffic from the
  host itself to a loopback address is masqueraded (its 127.x source cannot leave the host), and
  the bridge gets ``route_localnet`` so such packets may be routed out of it at all. A remote
  client's packets are routed from its interface to the bridge, which needs
  ``net.ipv4.ip_forward = 1``: the daemon does not make the host a router by itself (a host-wide
  change), it warns when remote clients are shut out.
- ``UserspaceForwarder`` (``vmm.net.proxy``): asyncio listeners, where nftables is not usable.
  The guest sees the host's bridge address as every client's.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from vmm.core.config import NetworkingConfig
from vmm.core.host_tool import run_host_tool
from vmm.model.vm import Vm
from vmm.net.nics import resolve_networks
from vmm.net.proxy import UserspaceForwarder

log = logging.getLogger(__name__)

TABLE = "vmm_forward"
NFT_TIMEOUT = 10.0
PROC_CONF = Path("/proc/sys/net/ipv4/conf")
IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")


@dataclass(frozen=True, order=True)
class Forward:
    protocol: str  # tcp | udp
    address: str  # host address; 0.0.0.0 means every local address
    host_port: int
    guest_ip: str
    vm_port: int
    bridge: str
    vm_id: str

    def describe(self) -> str:
        return (f"{self.protocol} {self.address}:{self.host_port} -> "
                f"{self.guest_ip}:{self.vm_port}")  # fmt: skip


def desired(vms: Iterable[Vm], networking: NetworkingConfig,
            leases: Callable[[str], Mapping[int, str]]) -> list[Forward]:  # fmt: skip
    """Every forward that should be in force now: running VMs' leased bridge NICs' mappings."""
    result = []
    for vm in vms:
        if not vm.running or vm.removing:
            continue
        ips = leases(vm.id)
        try:
            nics = resolve_networks(vm.manifest, networking)
        except ValueError:
            continue
        for nic in nics:
            ip = ips.get(nic.index)
            if nic.mode != "bridge" or not ip:
                continue
            result += [Forward(p.protocol, p.address or "0.0.0.0", p.host_port, ip, p.vm_port,
                               nic.bridge, vm.id) for p in nic.ports]  # fmt: skip
    return sorted(result)


class Forwarder(Protocol):
    name: str

    async def apply(self, forwards: Sequence[Forward]) -> None: ...

    async def close(self) -> None: ...


def nft_script(forwards: Iterable[Forward], table: str = TABLE) -> str:
    """The nft transaction that replaces ``table`` with exactly ``forwards`` (pure)."""
    output, prerouting, masquerade = [], [], set()
    for fw in forwards:
        target = f"{fw.protocol} dport {fw.host_port} dnat to {fw.guest_ip}:{fw.vm_port}"
        wildcard = fw.address == "0.0.0.0"
        match = "fib daddr type local" if wildcard else f"ip daddr {fw.address}"
        output.append(f"{match} {target}")
        if wildcard or not ipaddress.IPv4Address(fw.address).is_loopback:
            prerouting.append(f"{match} {target}")
        if wildcard or ipaddress.IPv4Address(fw.address).is_loopback:
            masquerade.add(fw.guest_ip)
    lines = [f"table ip {table}", f"delete table ip {table}"]
    if not output:
        return "\n".join(lines) + "\n"
    lines.append(f"table ip {table} {{")
    for chain, hook, priority, rules in (
        ("output", "output", "-100", output),
        ("prerouting", "prerouting", "-100", prerouting),
        ("postrouting", "postrouting", "100",
         [f"ip saddr 127.0.0.0/8 ip daddr {ip} masquerade" for ip in sorted(masquerade)]),
    ):  # fmt: skip
        lines.append(f"\tchain {chain} {{")
        lines.append(f"\t\ttype nat hook {hook} priority {priority}; policy accept;")
        lines += [f"\t\t{rule}" for rule in rules]
        lines.append("\t}")
    lines.append("}")
    return "\n".join(lines) + "\n"


async def run_nft(script: str) -> None:
    try:
        status, err = await run_host_tool(["nft", "-f", "-"], NFT_TIMEOUT, stdin=script.encode())
    except TimeoutError:
        raise OSError(f"nft: no answer within {NFT_TIMEOUT:g}s") from None
    if status != 0:
        raise OSError(f"nft: {err.decode(errors='replace').strip()}")


async def nft_usable() -> bool:
    """Whether nft exists and may change this namespace's ruleset (an empty transaction)."""
    if shutil.which("nft") is None:
        return False
    try:
        await run_nft(nft_script(()))
    except OSError as exc:
        log.info("nftables not usable (%s): port forwards run in user space", exc)
        return False
    return True


class NftForwarder:
    name = "nft"

    def __init__(self, table: str = TABLE) -> None:
        self.table = table

    async def apply(self, forwards: Sequence[Forward]) -> None:
        for bridge in sorted({fw.bridge for fw in forwards}):
            _allow_localnet(bridge)
        await run_nft(nft_script(forwards, self.table))
        _warn_without_routing(forwards)

    async def close(self) -> None:
        """Rules stay: VMs outlive the daemon, and their forwards with them."""


def _warn_without_routing(forwards: Sequence[Forward]) -> None:
    remote = [fw for fw in forwards
              if fw.address == "0.0.0.0" or not ipaddress.IPv4Address(fw.address).is_loopback]
    if not remote:
        return
    try:
        routing = IP_FORWARD.read_text().strip() != "0"
    except OSError:
        return
    if not routing:
        log.warning("net.ipv4.ip_forward is 0: remote clients cannot reach %d port forwards "
                    "(%s, ...); only this host's own clients can", len(remote),
                    remote[0].describe())  # fmt: skip


def _allow_localnet(bridge: str) -> None:
    # Host-local clients of a 127.x forward send from 127.x; the kernel drops such packets on a
    # real interface unless route_localnet is set on it (only the bridge's, nothing global).
    path = PROC_CONF / bridge / "route_localnet"
    try:
        if path.read_text().strip() != "1":
            path.write_text("1\n")
    except OSError as exc:
        log.warning("cannot set route_localnet on %s: %s", bridge, exc)


async def open_forwarder(networking: NetworkingConfig) -> Forwarder:
    """The forwarder ``[cvm.networking] forward`` asks for (auto: nft when usable)."""
    if networking.forward == "userspace":
        return UserspaceForwarder()
    if networking.forward == "nft" or await nft_usable():
        return NftForwarder()
    return UserspaceForwarder()


class Forwards:
    """The daemon's forwards: ``refresh`` makes what is in force match the registry."""

    def __init__(self, networking: NetworkingConfig, vms: Callable[[], Iterable[Vm]],
                 leases: Callable[[str], Mapping[int, str]]) -> None:  # fmt: skip
        self.networking = networking
        self._vms = vms
        self._leases = leases
        self._lock = asyncio.Lock()
        self._forwarder: Forwarder | None = None
        self._applied: list[Forward] | None = None

    @property
    def kind(self) -> str:
        return self._forwarder.name if self._forwarder else ""

    async def open(self) -> None:
        self._forwarder = await open_forwarder(self.networking)
        log.info("bridge port forwards: %s", self._forwarder.name)

    async def refresh(self) -> None:
        """Apply the forwards the registry calls for now; a failure is logged, never raised.

        A lifecycle call (a stop, a removal) must not fail because a forward could not be
        changed; the next refresh tries again, since the whole set is applied each time.
        """
        if self._forwarder is None:
            return
        async with self._lock:
            wanted = desired(self._vms(), self.networking, self._leases)
            if wanted == self._applied:
                return
            try:
                await self._forwarder.apply(wanted)
            except OSError as exc:
                log.warning("cannot apply %d port forwards: %s", len(wanted), exc)
                self._applied = None
                return
            self._applied = wanted
            log.info("port forwards (%s): %s", self._forwarder.name,
                     "; ".join(fw.describe() for fw in wanted) or "none")  # fmt: skip

    async def close(self) -> None:
        if self._forwarder is not None:
            await self._forwarder.close()
