"""A VM's manifest (``vm-manifest.json``) and desired state (``vm-state.json``).

The JSON keys and shapes are dstack's, so a work directory written by either VMM loads in the
other: ``port_map`` entries are ``{address, protocol, from, to}`` (host port, VM port), ``gpus``
is omitted when absent, ``networks`` is omitted when empty and mirrored into the legacy
``networking`` key. Reading is strict about types (a corrupt manifest is reported, never
half-loaded) and lenient about unknown keys (a newer VMM may add some).
"""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass, field, replace
from typing import Any, Literal

Protocol = Literal["tcp", "udp"]
NetMode = Literal["user", "bridge", "passt", "custom"]
_MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")


class ManifestError(ValueError):
    """The manifest file is not a manifest; the message says which key is wrong."""


@dataclass(frozen=True)
class PortMap:
    protocol: Protocol
    host_port: int
    vm_port: int
    address: str
    nic: int = 0  # index in the VM's networks of the NIC the mapping forwards to

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "address": self.address,
            "protocol": self.protocol,
            "from": self.host_port,
            "to": self.vm_port,
        }
        if self.nic:  # omitted for NIC 0, so single-NIC manifests stay as dstack writes them
            data["nic"] = self.nic
        return data


@dataclass(frozen=True)
class GpuSpec:
    slot: str


@dataclass(frozen=True)
class GpuAttachment:
    attach_mode: Literal["listed", "all"]
    gpus: tuple[GpuSpec, ...] = ()
    bridges: tuple[GpuSpec, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "attach_mode": self.attach_mode,
            "gpus": [{"slot": g.slot} for g in self.gpus],
            "bridges": [{"slot": b.slot} for b in self.bridges],
        }


@dataclass(frozen=True)
class Network:
    """One NIC's requested networking; empty fields fall back to ``[cvm.networking]``."""

    mode: NetMode
    bridge: str = ""
    mac: str = ""  # empty: derived from the VM id and the NIC's index

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"mode": self.mode}
        if self.bridge:
            data["bridge"] = self.bridge
        if self.mac:
            data["mac"] = self.mac
        return data


@dataclass(frozen=True)
class Manifest:
    id: str
    name: str
    app_id: str
    image: str
    vcpu: int
    memory: int  # MB
    disk_size: int  # GB
    created_at_ms: int
    port_map: tuple[PortMap, ...] = ()
    hugepages: bool = False
    pin_numa: bool = False
    gpus: GpuAttachment | None = None
    kms_urls: tuple[str, ...] = ()
    gateway_urls: tuple[str, ...] = ()
    no_tee: bool = False
    swtpm: bool = False
    networks: tuple[Network, ...] = ()
    volumes: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def evolve(self, **changes: Any) -> Manifest:
        return replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = dict(self.extra)
        data.update(
            {
                "id": self.id,
                "name": self.name,
                "app_id": self.app_id,
                "image": self.image,
                "vcpu": self.vcpu,
                "memory": self.memory,
                "disk_size": self.disk_size,
                "port_map": [p.to_json() for p in self.port_map],
                "created_at_ms": self.created_at_ms,
                "hugepages": self.hugepages,
                "pin_numa": self.pin_numa,
                "kms_urls": list(self.kms_urls),
                "gateway_urls": list(self.gateway_urls),
                "no_tee": self.no_tee,
                "swtpm": self.swtpm,
            }
        )
        if self.gpus is not None:
            data["gpus"] = self.gpus.to_json()
        if self.networks:
            data["networks"] = [n.to_json() for n in self.networks]
            data["networking"] = self.networks[0].to_json()
        if self.volumes:
            data["volumes"] = [{"source": v} for v in self.volumes]
        return data

    def dumps(self) -> bytes:
        return json.dumps(self.to_json(), indent=2, sort_keys=True).encode() + b"\n"

    @classmethod
    def loads(cls, data: bytes | str) -> Manifest:
        try:
            value = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ManifestError(f"not JSON: {exc}") from None
        return cls.from_json(value)

    @classmethod
    def from_json(cls, value: object) -> Manifest:
        if not isinstance(value, dict):
            raise ManifestError("the manifest must be a JSON object")
        r = _Reader(value)
        networks = r.list_of("networks", _network, default=[])
        legacy = value.get("networking")
        if not networks and isinstance(legacy, dict):
            networks = [_network(legacy, "networking")]
        known = {
            "id", "name", "app_id", "image", "vcpu", "memory", "disk_size", "port_map",
            "created_at_ms", "hugepages", "pin_numa", "gpus", "kms_urls", "gateway_urls",
            "no_tee", "swtpm", "networks", "networking", "volumes",
        }  # fmt: skip
        gpus_value = value.get("gpus")
        return cls(
            id=r.text("id"),
            name=r.text("name"),
            app_id=r.text("app_id"),
            image=r.text("image"),
            vcpu=r.number("vcpu"),
            memory=r.number("memory"),
            disk_size=r.number("disk_size"),
            created_at_ms=r.number("created_at_ms", default=0),
            port_map=tuple(r.list_of("port_map", _port_map, default=[])),
            hugepages=r.flag("hugepages", default=False),
            pin_numa=r.flag("pin_numa", default=False),
            gpus=None if gpus_value is None else _gpus(gpus_value, "gpus"),
            kms_urls=tuple(r.list_of("kms_urls", _string, default=[])),
            gateway_urls=tuple(r.list_of("gateway_urls", _string, default=[])),
            no_tee=r.flag("no_tee", default=False),
            swtpm=r.flag("swtpm", default=False),
            networks=tuple(networks),
            volumes=tuple(r.list_of("volumes", _volume, default=[])),
            extra={k: v for k, v in value.items() if k not in known},
        )


@dataclass(frozen=True)
class DesiredState:
    """``vm-state.json``: whether the VM should be running. Missing file = not started."""

    started: bool

    def dumps(self) -> bytes:
        return json.dumps({"started": self.started}).encode() + b"\n"

    @classmethod
    def loads(cls, data: bytes | str) -> DesiredState:
        try:
            value = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ManifestError(f"vm-state.json is not JSON: {exc}") from None
        if not isinstance(value, dict) or not isinstance(value.get("started", False), bool):
            raise ManifestError("vm-state.json must be {\"started\": true|false}")
        return cls(started=value.get("started", False))


class _Reader:
    _MISSING = object()

    def __init__(self, value: dict[str, Any], where: str = "") -> None:
        self.value = value
        self.where = where

    def _get(self, key: str, default: object) -> object:
        if key in self.value and self.value[key] is not None:
            return self.value[key]
        if default is self._MISSING:
            raise ManifestError(f"missing key `{self.where}{key}`")
        return default

    def text(self, key: str, default: object = _MISSING) -> str:
        value = self._get(key, default)
        if not isinstance(value, str):
            raise ManifestError(f"`{self.where}{key}` must be a string")
        return value

    def number(self, key: str, default: object = _MISSING) -> int:
        value = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ManifestError(f"`{self.where}{key}` must be a non-negative integer")
        return value

    def flag(self, key: str, default: object = _MISSING) -> bool:
        value = self._get(key, default)
        if not isinstance(value, bool):
            raise ManifestError(f"`{self.where}{key}` must be true or false")
        return value

    def list_of(self, key: str, item: Any, default: object = _MISSING) -> list[Any]:
        value = self._get(key, default)
        if not isinstance(value, list):
            raise ManifestError(f"`{self.where}{key}` must be an array")
        return [item(v, f"{self.where}{key}[{i}]") for i, v in enumerate(value)]


def _object(value: object, where: str) -> _Reader:
    if not isinstance(value, dict):
        raise ManifestError(f"`{where}` must be an object")
    return _Reader(value, f"{where}.")


def _string(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise ManifestError(f"`{where}` must be a string")
    return value


def _port_map(value: object, where: str) -> PortMap:
    r = _object(value, where)
    protocol = r.text("protocol")
    if protocol not in ("tcp", "udp"):
        raise ManifestError(f"`{where}.protocol` must be tcp or udp")
    ports = {}
    for key, lowest in (("from", 0), ("to", 1)):  # host port 0: any free port (tests use it)
        ports[key] = r.number(key)
        if not lowest <= ports[key] <= 65535:
            raise ManifestError(f"`{where}.{key}` must be a port number {lowest}..65535")
    return PortMap(
        protocol=protocol,  # type: ignore[arg-type]  # checked just above
        host_port=ports["from"],
        vm_port=ports["to"],
        address=_host_address(r.text("address", default=""), f"{where}.address"),
        nic=r.number("nic", default=0),
    )


def _host_address(address: str, where: str) -> str:
    """Empty or an IP literal without a scope id: the address goes into QEMU's -netdev option.

    IPv6 stays readable (dstack writes it; QEMU 7.2 refuses it at start), but a scope id may
    carry any text, commas included, so a manifest edited on disk with option text in it is
    reported as broken instead of reaching the QEMU command line.
    """
    if not address:
        return address
    try:
        ipaddress.ip_address(address)
    except ValueError:
        pass
    else:
        if "%" not in address:
            return address
    raise ManifestError(f"`{where}` must be an IP address without a scope id, got {address!r}")


def _network(value: object, where: str) -> Network:
    r = _object(value, where)
    mode = r.text("mode", default="user")
    if mode not in ("user", "bridge", "passt", "custom"):
        raise ManifestError(f"`{where}.mode` must be user, bridge, passt or custom")
    bridge = r.text("bridge", default="") or r.text("bridge_name", default="")
    mac = r.text("mac", default="")
    if mac and not _MAC.fullmatch(mac):
        raise ManifestError(f"`{where}.mac` must be a MAC address like 02:ab:cd:ef:01:23")
    return Network(mode=mode, bridge=bridge, mac=mac)  # type: ignore[arg-type]  # checked above


def _gpus(value: object, where: str) -> GpuAttachment:
    r = _object(value, where)
    mode = r.text("attach_mode", default="listed")
    if mode not in ("listed", "all"):
        raise ManifestError(f"`{where}.attach_mode` must be listed or all")
    return GpuAttachment(
        attach_mode=mode,  # type: ignore[arg-type]  # checked just above
        gpus=tuple(GpuSpec(_object(g, f"{where}.gpus").text("slot")) for g in r.list_of(
            "gpus", lambda v, w: v, default=[])),
        bridges=tuple(GpuSpec(_object(b, f"{where}.bridges").text("slot")) for b in r.list_of(
            "bridges", lambda v, w: v, default=[])),
    )


def _volume(value: object, where: str) -> str:
    return _object(value, where).text("source")
