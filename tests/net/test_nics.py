"""NIC resolution, port placement, MAC checks and available modes (pure functions)."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmm.core.config import NetworkingConfig
from vmm.core.exceptions import InvalidField
from vmm.model.manifest import Manifest, Network, PortMap
from vmm.net.nics import (
    available_modes,
    check_distinct,
    check_mac,
    host_nics,
    interface_statuses,
    place_ports,
    resolve_networks,
)

NET = NetworkingConfig()
TCP = PortMap("tcp", 2080, 80, "127.0.0.1")
UDP = PortMap("udp", 2053, 53, "127.0.0.1")


def refusal(call: object) -> InvalidField:
    with pytest.raises(InvalidField) as caught:
        call()  # type: ignore[operator]
    return caught.value


def test_unnamed_mappings_go_to_the_first_user_nic() -> None:
    """A mapping without ``nic`` lands on the first user NIC, as dstack puts hostfwd there."""
    nets = (Network("bridge", "br0"), Network("user"), Network("user"))
    placed = place_ports((TCP, UDP), [None, 2], nets, NET)
    assert [p.nic for p in placed] == [1, 2]


def test_no_networks_means_one_default_nic() -> None:
    """With no networks the node default NIC 0 takes the mappings; NIC 1 does not exist."""
    assert place_ports((TCP,), [None], (), NET)[0].nic == 0
    error = refusal(lambda: place_ports((TCP,), [1], (), NET))
    assert error.field == "ports[0].nic" and "no NIC 1" in error.reason


def test_a_mapping_on_a_nic_that_cannot_forward_is_refused() -> None:
    """A mapping on a custom NIC is refused naming ports[i].nic and the mode; bridge NICs take one."""
    nets = (Network("bridge", "br0"), Network("custom"))
    assert place_ports((TCP,), [0], nets, NET)[0].nic == 0
    error = refusal(lambda: place_ports((TCP, UDP), [0, 1], nets, NET))
    assert error.field == "ports[1].nic"
    assert "NIC 1 is in custom mode" in error.reason


@pytest.mark.parametrize(
    ("mac", "reason"),
    [("01:00:5e:00:00:01", "multicast"), ("ff:ff:ff:ff:ff:ff", "multicast"),
     ("00:00:00:00:00:00", "all-zero"), ("02:ab:cd", "not a MAC"), ("02:ab:cd:ef:01:2g", "not a MAC"),
     ("02:ab:cd:ef:01:23,x", "not a MAC")],
)  # fmt: skip
def test_check_mac_refuses_what_is_not_a_unicast_mac(mac: str, reason: str) -> None:
    """Multicast, all-zero and malformed MACs are refused naming the field."""
    error = refusal(lambda: check_mac(mac, "networks[0].mac"))
    assert error.field == "networks[0].mac" and reason in error.reason


def test_check_mac_normalises_case_and_dashes() -> None:
    """A unicast MAC is accepted lowercased with colons."""
    assert check_mac("02-AB-cd-EF-01-23", "m") == "02:ab:cd:ef:01:23"


def test_duplicate_macs_are_refused() -> None:
    """Two NICs with one MAC (given, or given equal to a derived one) are refused."""
    derived = resolve_networks(Manifest(id="vm1", name="n", app_id="a", image="i", vcpu=1,
                                        memory=1, disk_size=1, created_at_ms=0), NET)[0].mac  # fmt: skip
    nets = (Network("user"), Network("user", mac=derived))
    error = refusal(lambda: check_distinct(nets, "vm1", NET, "networks"))
    assert error.field == "networks[1].mac" and "duplicates networks[0]" in error.reason
    check_distinct((Network("user"), Network("user")), "vm1", NET, "networks")


def test_resolved_nics_carry_their_own_mappings_and_macs() -> None:
    """Each resolved NIC holds the mappings placed on it and its MAC (given or derived)."""
    manifest = Manifest(
        id="vm2", name="n", app_id="a", image="i", vcpu=1, memory=1, disk_size=1,
        created_at_ms=0, networks=(Network("user"), Network("user", mac="02:00:00:00:00:07")),
        port_map=(TCP, PortMap("udp", 2053, 53, "127.0.0.1", nic=1)),
    )  # fmt: skip
    nics = resolve_networks(manifest, NET)
    assert [n.ports for n in nics] == [(TCP,), (manifest.port_map[1],)]
    assert nics[1].mac == "02:00:00:00:00:07" and nics[0].mac != nics[1].mac
    statuses = interface_statuses(nics, {1: "10.88.0.12"})
    assert [(s.mode, s.backend, s.netdev_id, s.ip, s.index) for s in statuses] == [
        ("user", "slirp", "net0", "", 0), ("user", "slirp", "net1", "10.88.0.12", 1)]  # fmt: skip



def test_host_nics_state_what_status_states() -> None:
    """/guest/NetworkInfo's host_nics carry each NIC's index, mode, MAC, bridge and leased IP,
    the same as Status's interfaces."""
    manifest = Manifest(
        id="vm3", name="n", app_id="a", image="i", vcpu=1, memory=1, disk_size=1,
        created_at_ms=0, networks=(Network("bridge", "br0"), Network("user")),
    )  # fmt: skip
    nics = resolve_networks(manifest, NET)
    ips = {0: "10.88.0.23"}
    listed = host_nics(nics, ips)
    assert [(h.index, h.mode, h.mac, h.bridge, h.ip) for h in listed] == [
        (0, "bridge", nics[0].mac, "br0", "10.88.0.23"), (1, "user", nics[1].mac, "", "")]
    statuses = interface_statuses(nics, ips)
    assert [(s.index, s.mode, s.mac, s.bridge_name, s.ip) for s in statuses] == [
        (h.index, h.mode, h.mac, h.bridge, h.ip) for h in listed]


def test_available_modes_follow_the_host(tmp_path: Path) -> None:
    """bridge is offered only with a bridge present and /dev/net/tun to make TAPs with."""
    assert available_modes(NET, tmp_path) == ["user"]
    (tmp_path / "sys/class/net/br7/bridge").mkdir(parents=True)
    assert available_modes(NET, tmp_path) == ["user"]  # no TUN device
    tun = tmp_path / "dev/net/tun"
    tun.parent.mkdir(parents=True)
    tun.touch()
    assert available_modes(NET, tmp_path) == ["user", "bridge"]
    assert available_modes(NetworkingConfig(bridge="br9"), tmp_path) == ["user"]
    assert available_modes(NetworkingConfig(bridge="br7"), tmp_path) == ["user", "bridge"]
    assert available_modes(NET, tmp_path, passt_found=True) == ["user", "bridge", "passt"]
