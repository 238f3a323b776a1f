"""A VM's NICs, resolved once from its manifest and ``[cvm.networking]`` for every consumer.

Both backends render the same ``ResolvedNic`` list (the QEMU argv, the libvirt domain), Status
reports it, and the lease book matches DHCP leases against its MACs. Port mappings name the NIC
they forward to; whether that NIC's mode can carry a forward is decided here, when the mapping is
set (CreateVm, UpdateVm), so a mapping is refused rather than silently lost at boot (dstack's
bridge-only VMs lost theirs, reference §11).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from vmm.core.config import NetworkingConfig, parse_mac_prefix
from vmm.core.exceptions import InvalidField
from vmm.model.manifest import Manifest, NetMode, Network, PortMap
from vmm.net.macs import derive_mac
from vmm.net.tap import tap_name
from vmm.rpc import guest_api_pb2 as gpb
from vmm.rpc import vmm_rpc_pb2 as pb

# The modes whose NICs can carry port mappings: slirp's hostfwd, and for bridge NICs the
# daemon's forwards to the leased IP (vmm.net.forwards). Custom netdevs are opaque.
FORWARDING_MODES: frozenset[str] = frozenset({"user", "bridge", "passt"})
# What Status calls each mode's QEMU backend (dstack's NetworkInterfaceStatus.backend words).
_BACKEND_OF: dict[str, str] = {"user": "slirp", "bridge": "tap_bridge", "passt": "passt",
                               "custom": "custom"}
_MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")


@dataclass(frozen=True)
class ResolvedNic:
    """One NIC after the per-VM entry is merged over ``[cvm.networking]``."""

    index: int
    mode: NetMode
    bridge: str  # bridge mode only
    mac: str
    netdev_id: str
    net: str
    dhcp_start: str
    restrict: bool
    netdev: str  # custom mode only: the configured -netdev string
    ports: tuple[PortMap, ...] = ()  # the mappings that forward to this NIC
    tap: str = ""  # bridge mode only: the TAP device the daemon makes on the bridge


def entries_of(manifest_networks: Sequence[Network], config: NetworkingConfig) -> tuple[Network, ...]:
    """The VM's NIC entries; none means one NIC in the node's default mode."""
    return tuple(manifest_networks) or (Network(mode=config.mode),)


def resolve_networks(manifest: Manifest, config: NetworkingConfig) -> tuple[ResolvedNic, ...]:
    """Merge each manifest NIC over the node default and attach its port mappings."""
    prefix = parse_mac_prefix(config.mac_prefix)
    nics = []
    for i, entry in enumerate(entries_of(manifest.networks, config)):
        netdev_id = f"net{i}"
        bridge = (entry.bridge or config.bridge) if entry.mode == "bridge" else ""
        if entry.mode == "bridge" and not bridge:
            raise ValueError(
                f"networks[{i}]: bridge mode needs a bridge name and cvm.networking.bridge is empty"
            )
        netdev = config.netdev if entry.mode == "custom" else ""
        if entry.mode == "custom" and f"id={netdev_id}" not in netdev.split(","):
            wanted = f"id={netdev_id}"
            raise ValueError(f"networks[{i}]: cvm.networking.netdev lacks {wanted}: {netdev!r}")
        nics.append(
            ResolvedNic(
                index=i,
                mode=entry.mode,
                bridge=bridge,
                mac=entry.mac or derive_mac(manifest.id, i, prefix),
                netdev_id=netdev_id,
                net=config.net,
                dhcp_start=config.dhcp_start,
                restrict=config.restrict,
                netdev=netdev,
                ports=tuple(p for p in manifest.port_map if p.nic == i),
                tap=tap_name(manifest.id, i) if entry.mode == "bridge" else "",
            )
        )
    return tuple(nics)


def default_port_nic(networks: Sequence[Network], config: NetworkingConfig) -> int:
    """Where a mapping that names no NIC goes: the first user NIC (dstack's rule), else NIC 0."""
    for i, entry in enumerate(entries_of(networks, config)):
        if entry.mode == "user":
            return i
    return 0


def place_ports(
    ports: Iterable[PortMap],
    wanted: Sequence[int | None],
    networks: Sequence[Network],
    config: NetworkingConfig,
) -> tuple[PortMap, ...]:
    """Give each mapping its NIC (``wanted[i]``, or the default) and refuse what it cannot carry.

    Raises ``InvalidField`` naming ``ports[i].nic``: a NIC that does not exist, or whose mode has
    no way to forward a host port.
    """
    entries = entries_of(networks, config)
    placed = []
    for i, (port, nic) in enumerate(zip(ports, wanted, strict=True)):
        index = default_port_nic(networks, config) if nic is None else nic
        field = f"ports[{i}].nic"
        if index >= len(entries):
            raise InvalidField(field, f"the VM has no NIC {index} (it has {len(entries)})")
        mode = entries[index].mode
        if mode not in FORWARDING_MODES:
            modes = ", ".join(sorted(FORWARDING_MODES))
            raise InvalidField(
                field,
                f"NIC {index} is in {mode} mode, which cannot forward host ports here "
                f"(modes that can: {modes})",
            )
        placed.append(replace(port, nic=index))
    return tuple(placed)


def check_mac(mac: str, field: str) -> str:
    """A NIC's requested MAC, lowercased; refused unless unicast (multicast bit clear)."""
    value = mac.strip().lower().replace("-", ":")
    if not _MAC.fullmatch(value):
        raise InvalidField(field, f"{mac!r} is not a MAC address like 02:ab:cd:ef:01:23")
    first = int(value[:2], 16)
    if first & 0x01:
        raise InvalidField(field, f"{mac!r} is a multicast MAC; a NIC needs a unicast one")
    if value == "00:00:00:00:00:00":
        raise InvalidField(field, "the all-zero MAC is not a NIC address")
    return value


def check_distinct(networks: Sequence[Network], manifest_id: str, config: NetworkingConfig,
                   field: str) -> None:
    """Refuse two NICs with the same MAC: the guest and DHCP could not tell them apart."""
    prefix = parse_mac_prefix(config.mac_prefix)
    seen: dict[str, int] = {}
    for i, entry in enumerate(networks):
        mac = entry.mac or derive_mac(manifest_id, i, prefix)
        if mac in seen:
            raise InvalidField(f"{field}[{i}].mac", f"duplicates {field}[{seen[mac]}] ({mac})")
        seen[mac] = i


def interface_statuses(
    nics: Iterable[ResolvedNic], ips: Mapping[int, str]
) -> list[pb.NetworkInterfaceStatus]:
    """Status's view of each NIC; ``ips`` holds the leased IPv4 address by NIC index."""
    result = []
    for nic in nics:
        status = pb.NetworkInterfaceStatus(
            mode=nic.mode,
            backend=_BACKEND_OF.get(nic.mode, nic.mode),
            mac=nic.mac,
            netdev_id=nic.netdev_id,
            ip=ips.get(nic.index, ""),
            index=nic.index,
        )
        if nic.bridge:
            status.bridge_name = nic.bridge
        result.append(status)
    return result


def host_nics(nics: Iterable[ResolvedNic], ips: Mapping[int, str]) -> list[gpb.HostNic]:
    """The same facts for /guest/NetworkInfo's ``host_nics``, which the /guest proxy adds."""
    return [gpb.HostNic(index=nic.index, mode=nic.mode, mac=nic.mac, bridge=nic.bridge,
                        ip=ips.get(nic.index, "")) for nic in nics]  # fmt: skip


TUN_DEVICE = Path("/dev/net/tun")


def available_modes(networking: NetworkingConfig, root: Path = Path("/"), *,
                    passt_found: bool = False) -> list[str]:
    """The modes a VM can be created with on this host now (GetMeta's ``supported_modes``).

    ``user`` always; ``bridge`` when the daemon can make TAPs (/dev/net/tun) and a bridge exists
    (the configured default, or any when none is configured, since a VM may name its own);
    ``passt`` when its binary is installed.
    """
    modes = ["user"]
    net = root / "sys/class/net"
    if networking.bridge:
        bridge_there = (net / networking.bridge / "bridge").is_dir()
    else:
        bridge_there = any(net.glob("*/bridge"))
    if bridge_there and (root / TUN_DEVICE.relative_to("/")).exists():
        modes.append("bridge")
    if passt_found:
        modes.append("passt")
    return modes
