"""The daemon's configuration: vmm.toml loaded into typed, frozen objects.

The defaults below ARE the embedded default config; ``vmm.toml.example`` lists every key with
its default (a test keeps the two in step). Keys follow the dstack VMM's vmm.toml where a key
applies here; keys that are ours (``cvm.accel``, ``cvm.cpu``, ``cvm.guest_channel``,
``max_request_body`` …) say so in the example file.

Relative paths are relative to the daemon's working directory, as in dstack.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from vmm.core.exceptions import ConfigError
from vmm.core.typed_toml import Size, build

DEFAULT_ADDRESS = "tcp:127.0.0.1:9080"
STATE_DIR = "./.state"


@dataclass(frozen=True)
class ImageConfig:
    path: str = f"{STATE_DIR}/images"
    registry: str = ""
    registry_ca_file: str = ""  # ours: a PEM bundle that replaces the system CAs for the registry
    registry_plain_http: bool = False  # ours: http instead of https, for a loopback registry only


@dataclass(frozen=True)
class ProductConfig:
    """SMBIOS strings passed to QEMU (``-smbios type=0..3``); empty means not set."""

    sys_vendor: str = "dstack"
    product_name: str = "dstack"
    bios_vendor: str = ""
    bios_version: str = ""
    bios_date: str = ""
    bios_release: str = ""
    product_version: str = ""
    product_serial: str = ""
    product_uuid: str = ""
    product_family: str = ""
    product_sku: str = ""
    board_vendor: str = ""
    board_name: str = ""
    board_version: str = ""
    board_serial: str = ""
    board_asset_tag: str = ""
    chassis_vendor: str = ""
    chassis_version: str = ""
    chassis_serial: str = ""
    chassis_asset_tag: str = ""


@dataclass(frozen=True)
class NetworkingConfig:
    mode: Literal["user", "bridge", "custom"] = "user"
    net: str = "10.0.2.0/24"
    dhcp_start: str = "10.0.2.10"
    restrict: bool = False
    bridge: str = ""
    mac_prefix: str = ""
    netdev: str = ""
    forward: Literal["auto", "nft", "userspace"] = "auto"


@dataclass(frozen=True)
class PortRange:
    protocol: Literal["tcp", "udp"] = "tcp"
    from_port: int = field(default=1, metadata={"toml": "from"})
    to_port: int = field(default=20000, metadata={"toml": "to"})


@dataclass(frozen=True)
class PortMappingConfig:
    enabled: bool = False
    address: str = "127.0.0.1"
    range: tuple[PortRange, ...] = (PortRange(),)


@dataclass(frozen=True)
class AutoRestartConfig:
    enabled: bool = True
    interval: int = 20
    max_retries: int = 5
    initial_backoff: int = 5
    max_backoff: int = 300
    reset_window: int = 300


@dataclass(frozen=True)
class LogConfig:
    max_bytes: Size = 4 * 1024 * 1024
    max_backups: int = 3
    check_interval_secs: int = 5


@dataclass(frozen=True)
class GpuConfig:
    enabled: bool = False
    listing: tuple[str, ...] = ("10de:2335",)
    exclude: tuple[str, ...] = ()
    include: tuple[str, ...] = ()
    allow_attach_all: bool = True


@dataclass(frozen=True)
class CvmConfig:
    # What runs the VMs: "qemu" (processes owned by our supervisor) or "libvirt" (domains).
    backend: Literal["qemu", "libvirt"] = "qemu"
    qemu_path: str = ""
    # auto picks the TEE the host has (TDX or SEV-SNP), else none.
    platform: Literal["auto", "tdx", "sev-snp", "amd-sev-snp", "none"] = "auto"
    # auto picks KVM only where the CPU has vmx/svm and /dev/kvm works, else TCG.
    accel: Literal["auto", "kvm", "tcg"] = "auto"
    # "" picks host (KVM), EPYC-v4 (SEV-SNP) or max (TCG).
    cpu: str = ""
    # auto picks vsock where /dev/vhost-vsock exists, else virtio-serial over Unix sockets.
    guest_channel: Literal["auto", "vsock", "serial"] = "auto"
    kms_urls: tuple[str, ...] = ("http://127.0.0.1:8081",)
    gateway_urls: tuple[str, ...] = ("http://127.0.0.1:8082",)
    pccs_url: str = ""
    docker_registry: str = ""
    volumes_dir: str = ""
    cid_start: int = 1000
    cid_pool_size: int = 1000
    max_allocable_vcpu: int = 20
    max_allocable_memory_in_mb: int = 100000
    max_disk_size_gb: int = 4096
    min_memory_mb: int = 64
    qmp_socket: bool = True
    user: str = ""
    instance_id: str = ""
    use_mrconfigid: bool = True
    qemu_pci_hole64_size: Size = 0
    qemu_hotplug_off: bool = False
    tdx_attestation_variant: Literal["auto", "legacy", "lite"] = "auto"
    host_share_mode: Literal["9p", "vhd", "vvfat"] = "9p"
    qgs_port: int = 4050
    shutdown_timeout: int = 60
    product: ProductConfig = ProductConfig()
    networking: NetworkingConfig = NetworkingConfig()
    port_mapping: PortMappingConfig = PortMappingConfig()
    auto_restart: AutoRestartConfig = AutoRestartConfig()
    log: LogConfig = LogConfig()
    gpu: GpuConfig = GpuConfig()


@dataclass(frozen=True)
class GatewayConfig:
    base_domain: str = "localhost"
    port: int = 8082
    agent_port: int = 8090


@dataclass(frozen=True)
class AuthConfig:
    enabled: bool = False
    tokens: tuple[str, ...] = ()
    htpasswd_file: str = ""


@dataclass(frozen=True)
class SupervisorConfig:
    sock: str = f"{STATE_DIR}/run/supervisor.sock"
    pid_file: str = f"{STATE_DIR}/run/supervisor.pid"
    log_file: str = f"{STATE_DIR}/run/supervisor.log"
    state_file: str = f"{STATE_DIR}/run/supervisor-state.json"
    auto_start: bool = True


@dataclass(frozen=True)
class LibvirtConfig:
    # The libvirt daemon the libvirt backend uses (qemu:///system, or qemu+unix:///system?socket=...).
    uri: str = "qemu:///system"
    # Domains are named <prefix><VM id>; others are never touched.
    domain_prefix: str = "vmm-"


@dataclass(frozen=True)
class HostApiConfig:
    ident: str = "dstack VMM"
    address: str = "vsock:2"
    port: int = 10000


@dataclass(frozen=True)
class KeyProviderConfig:
    enabled: bool = True
    address: str = "127.0.0.1"
    port: int = 3443


@dataclass(frozen=True)
class ServerConfig:
    """How the API listeners treat slow, numerous or heavy clients (all keys are ours)."""

    # Seconds a client has to send a whole request head (from connecting, or from the first
    # byte of a later request on a kept-alive connection); then it gets a 408 and is closed.
    header_timeout: float = 10.0
    # Seconds a client has to send a whole request body once the head is in; then it is closed.
    body_timeout: float = 60.0
    # Open connections per listener; past it, the oldest connection still waiting for a request
    # head is closed to make room, or the newcomer gets a 503 when every connection is busy.
    max_connections: int = 512
    # Bytes all request bodies being read or handled may hold together.
    body_memory: Size = 40 * 1024 * 1024
    # Seconds a request waits for body_memory to free up before it gets a 503.
    body_memory_wait: float = 2.0


@dataclass(frozen=True)
class Config:
    # One listen address, or several served by the same process: "tcp:HOST:PORT" | "unix:PATH".
    address: str | tuple[str, ...] = DEFAULT_ADDRESS
    kms_url: str = "http://127.0.0.1:8081"
    event_buffer_size: int = 20
    node_name: str = ""
    run_path: str = f"{STATE_DIR}/vm"
    max_request_body: Size = 10 * 1024 * 1024
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # "tcp:HOST:PORT" | "unix:PATH": also serve /metrics there, without auth ("" = only on
    # `address`, behind auth like every route).
    metrics_address: str = ""
    # "tcp:HOST:PORT" | "unix:PATH": serve the Vmm service over native gRPC there too ("" = off).
    grpc_address: str = ""
    image: ImageConfig = ImageConfig()
    cvm: CvmConfig = CvmConfig()
    gateway: GatewayConfig = GatewayConfig()
    auth: AuthConfig = AuthConfig()
    supervisor: SupervisorConfig = SupervisorConfig()
    libvirt: LibvirtConfig = LibvirtConfig()
    host_api: HostApiConfig = HostApiConfig()
    key_provider: KeyProviderConfig = KeyProviderConfig()
    server: ServerConfig = ServerConfig()

    @property
    def addresses(self) -> tuple[str, ...]:
        return (self.address,) if isinstance(self.address, str) else self.address


def load_config(path: Path | None = None) -> Config:
    """Load ``path`` over the embedded defaults and validate it; raise ConfigError if bad."""
    if path is None:
        return validate(Config())
    try:
        with path.open("rb") as fp:
            table = tomllib.load(fp)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    return validate(parse_config(table))


def parse_config(table: dict[str, object]) -> Config:
    return build(Config, table)


def validate(config: Config) -> Config:
    """Check what types alone cannot; every message names the key."""
    if not config.addresses:
        raise ConfigError("`address`: at least one listen address is required")
    for address in config.addresses:
        parse_address(address)
    for key in ("metrics_address", "grpc_address"):
        extra = getattr(config, key)
        if extra:
            try:
                parse_address(extra)
            except ConfigError as exc:
                raise ConfigError(exc.message.replace("`address`", f"`{key}`", 1)) from None
    _check_url("kms_url", config.kms_url, allow_empty=True)
    _positive("event_buffer_size", config.event_buffer_size)
    if config.max_request_body < 1024:
        raise ConfigError("`max_request_body`: must be at least 1K")
    _check_server(config.server, config.max_request_body)
    _check_registry(config.image)
    cvm = config.cvm
    if cvm.cid_start < 3:
        raise ConfigError("`cvm.cid_start`: must be >= 3 (0-2 are reserved by vsock)")
    _positive("cvm.cid_pool_size", cvm.cid_pool_size)
    if cvm.cid_start + cvm.cid_pool_size > 2**32 - 1:
        raise ConfigError("`cvm.cid_pool_size`: cid_start + cid_pool_size overflows 32 bits")
    _positive("cvm.max_allocable_vcpu", cvm.max_allocable_vcpu)
    _positive("cvm.max_allocable_memory_in_mb", cvm.max_allocable_memory_in_mb)
    _positive("cvm.max_disk_size_gb", cvm.max_disk_size_gb)
    _positive("cvm.min_memory_mb", cvm.min_memory_mb)
    _positive("cvm.shutdown_timeout", cvm.shutdown_timeout)
    for i, url in enumerate(cvm.kms_urls):
        _check_url(f"cvm.kms_urls[{i}]", url)
    for i, url in enumerate(cvm.gateway_urls):
        _check_url(f"cvm.gateway_urls[{i}]", url)
    _check_url("cvm.pccs_url", cvm.pccs_url, allow_empty=True)
    restart = cvm.auto_restart
    _positive("cvm.auto_restart.interval", restart.interval)
    if restart.initial_backoff > restart.max_backoff:
        raise ConfigError(
            "`cvm.auto_restart.initial_backoff`: must not exceed cvm.auto_restart.max_backoff"
        )
    for i, port_range in enumerate(cvm.port_mapping.range):
        key = f"cvm.port_mapping.range[{i}]"
        if not 1 <= port_range.from_port <= port_range.to_port <= 65535:
            raise ConfigError(f"`{key}`: need 1 <= from <= to <= 65535")
    try:
        ipaddress.IPv4Address(cvm.port_mapping.address)
    except ValueError:
        # QEMU 7.2's hostfwd takes IPv4 only, and the address is written into its option text.
        raise ConfigError(f"`cvm.port_mapping.address`: {cvm.port_mapping.address!r} is not an "
                          "IPv4 address") from None
    net = cvm.networking
    try:
        network = ipaddress.IPv4Network(net.net, strict=True)
        if ipaddress.IPv4Address(net.dhcp_start) not in network:
            raise ConfigError("`cvm.networking.dhcp_start`: must be inside cvm.networking.net")
    except ValueError as exc:
        raise ConfigError(f"`cvm.networking.net`/`dhcp_start`: {exc}") from None
    parse_mac_prefix(net.mac_prefix)
    if net.mode == "bridge" and not net.bridge:
        raise ConfigError("`cvm.networking.bridge`: required when cvm.networking.mode = \"bridge\"")
    if net.mode == "custom" and not net.netdev:
        raise ConfigError("`cvm.networking.netdev`: required when cvm.networking.mode = \"custom\"")
    if cvm.log.max_backups < 0:
        raise ConfigError("`cvm.log.max_backups`: must be >= 0")
    _positive("cvm.log.check_interval_secs", cvm.log.check_interval_secs)
    if not config.supervisor.sock:
        raise ConfigError("`supervisor.sock`: must not be empty")
    if not config.libvirt.uri:
        raise ConfigError("`libvirt.uri`: must not be empty")
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,32}", config.libvirt.domain_prefix):
        raise ConfigError("`libvirt.domain_prefix`: 1-32 of A-Z a-z 0-9 _ . -")
    parse_vsock_address(config.host_api.address)
    if not 0 < config.host_api.port < 2**32:
        raise ConfigError("`host_api.port`: must be a positive 32-bit port")
    return config


def _check_server(server: ServerConfig, max_request_body: int) -> None:
    if not server.header_timeout > 0:
        raise ConfigError(f"`server.header_timeout`: must be > 0, got {server.header_timeout}")
    if not server.body_timeout > 0:
        raise ConfigError(f"`server.body_timeout`: must be > 0, got {server.body_timeout}")
    _positive("server.max_connections", server.max_connections)
    if server.body_memory < max_request_body:
        raise ConfigError(
            f"`server.body_memory`: must be at least max_request_body ({max_request_body} bytes),"
            f" got {server.body_memory}"
        )
    if not server.body_memory_wait >= 0:
        raise ConfigError(f"`server.body_memory_wait`: must be >= 0, got {server.body_memory_wait}")


def parse_address(address: str) -> tuple[Literal["tcp", "unix"], str, int]:
    """Parse ``tcp:HOST:PORT``, ``tcp:HOST`` (port 8000) or ``unix:PATH``.

    Returns (kind, host or path, port).
    """
    text = address.strip()
    kind, sep, rest = text.partition(":")
    kind = kind.lower()
    if not sep or kind not in ("tcp", "unix") or not rest:
        raise ConfigError(
            f"`address`: {address!r} is not \"tcp:HOST:PORT\" or \"unix:PATH\""
        )
    if kind == "unix":
        return "unix", rest, 0
    host, port = rest, 8000
    if rest.startswith("["):  # [::1]:9080
        end = rest.find("]")
        if end < 0:
            raise ConfigError(f"`address`: unterminated IPv6 literal in {address!r}")
        host, tail = rest[1:end], rest[end + 1 :]
        if tail:
            port = _port(tail.removeprefix(":"), address)
    elif rest.count(":") == 1:
        host, port_text = rest.split(":")
        port = _port(port_text, address)
    _check_ip("address", host)
    return "tcp", host, port


def parse_vsock_address(address: str) -> int:
    """``vsock:<cid>`` (decimal or 0x hex) → the CID."""
    kind, _, cid = address.strip().partition(":")
    try:
        if kind.lower() != "vsock":
            raise ValueError
        return int(cid, 16) if cid.lower().startswith("0x") else int(cid, 10)
    except ValueError:
        raise ConfigError(f"`host_api.address`: {address!r} is not \"vsock:<cid>\"") from None


def parse_mac_prefix(prefix: str) -> bytes:
    """Parse ``cvm.networking.mac_prefix``: 0 to 3 hex bytes, ``:``/``-`` separated or not."""
    digits = prefix.replace(":", "").replace("-", "")
    try:
        value = bytes.fromhex(digits)
    except ValueError:
        raise ConfigError(f"`cvm.networking.mac_prefix`: not hex bytes: {prefix!r}") from None
    if len(value) > 3:
        raise ConfigError("`cvm.networking.mac_prefix`: at most 3 bytes")
    return value


def _port(text: str, address: str) -> int:
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise ConfigError(f"`address`: bad port in {address!r}")
    return int(text)


def _check_ip(key: str, host: str) -> None:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if host != "localhost":
            raise ConfigError(f"`{key}`: {host!r} is not an IP address") from None


def _check_url(key: str, url: str, *, allow_empty: bool = False) -> None:
    if not url and allow_empty:
        return
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"`{key}`: {url!r} is not an http(s) URL with a host")


# Distribution's reference grammar: a host (name or IP, optional port) and a lowercase repository
# path; an IPv6 host is written in brackets.
_REGISTRY_HOST = re.compile(
    r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?)(?::(\d{1,5}))?$")
_REPO_COMPONENT = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")


@dataclass(frozen=True)
class RegistryRef:
    """``[image] registry`` split into where to connect and which repository to read."""

    host: str  # without brackets for IPv6
    port: int | None
    repository: str

    @property
    def netloc(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port is None else f"{host}:{self.port}"

    @property
    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


def parse_registry(ref: str, key: str = "image.registry") -> RegistryRef:
    """``host[:port]/repo[/more]`` as a RegistryRef; ConfigError naming ``key`` otherwise."""
    netloc, slash, repository = ref.partition("/")
    host_match = _REGISTRY_HOST.match(netloc)
    if not slash or host_match is None:
        raise ConfigError(f"`{key}`: {ref!r} is not \"host[:port]/repository\"")
    port = int(host_match.group(2)) if host_match.group(2) else None
    if port is not None and not 1 <= port <= 65535:
        raise ConfigError(f"`{key}`: port {port} is out of range")
    if len(repository) > 255 or not all(_REPO_COMPONENT.match(c) for c in repository.split("/")):
        raise ConfigError(
            f"`{key}`: repository {repository!r} must be lowercase path components "
            "(a-z 0-9 separated by . _ __ -)"
        )
    return RegistryRef(host_match.group(1).strip("[]"), port, repository)


def _check_registry(image: ImageConfig) -> None:
    if not image.registry:
        return
    ref = parse_registry(image.registry)
    if image.registry_plain_http and not ref.is_loopback:
        raise ConfigError(
            f"`image.registry_plain_http`: plain http is allowed only for a loopback registry, "
            f"not {ref.host!r}"
        )
    if image.registry_ca_file and not Path(image.registry_ca_file).is_file():
        raise ConfigError(f"`image.registry_ca_file`: {image.registry_ca_file} is not a file")


def _positive(key: str, value: int) -> None:
    if value <= 0:
        raise ConfigError(f"`{key}`: must be > 0, got {value}")
