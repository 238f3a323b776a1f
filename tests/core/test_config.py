"""vmm.toml loading: defaults, strictness and the messages that name the key."""

from __future__ import annotations

import dataclasses
import itertools
import tomllib
from pathlib import Path
from typing import Any

import pytest

from vmm.core.config import Config, load_config, parse_address, parse_config
from vmm.core.exceptions import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def _all_keys(obj: Any, prefix: str = "") -> set[str]:
    keys: set[str] = set()
    for field in dataclasses.fields(obj):
        name = field.metadata.get("toml", field.name)
        value = getattr(obj, field.name)
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(value):
            keys |= _all_keys(value, f"{key}.")
        else:
            keys.add(key)
    return keys


def _toml_keys(table: dict[str, Any], prefix: str = "") -> set[str]:
    keys: set[str] = set()
    for name, value in table.items():
        if isinstance(value, dict):
            keys |= _toml_keys(value, f"{prefix}{name}.")
        else:
            keys.add(f"{prefix}{name}")
    return keys


def test_example_file_lists_every_key_with_its_default() -> None:
    """vmm.toml.example parses to exactly the embedded defaults and names every key."""
    with (ROOT / "vmm.toml.example").open("rb") as fp:
        table = tomllib.load(fp)
    assert parse_config(table) == Config()
    assert _toml_keys(table) == _all_keys(Config())


def test_example_file_has_a_comment_for_every_key() -> None:
    """Every key line in the example (outside the SMBIOS strings block) follows a comment."""
    lines = (ROOT / "vmm.toml.example").read_text().splitlines()
    smbios_extras = False
    for previous, line in itertools.pairwise(lines):
        if line.startswith("# Further SMBIOS"):
            smbios_extras = True
        if line.startswith("["):
            smbios_extras = False
        if "=" in line and not line.startswith("#") and not smbios_extras:
            assert previous.startswith("#"), f"no comment above: {line}"


def test_no_file_means_embedded_defaults() -> None:
    """Without a file the daemon runs on the defaults: TCP 9080 on loopback, state in ./.state."""
    config = load_config(None)
    assert config.addresses == ("tcp:127.0.0.1:9080",)
    assert config.run_path == "./.state/vm"
    assert config.cvm.cid_start == 1000
    assert config.cvm.log.max_bytes == 4 * 1024 * 1024
    assert config.max_request_body == 10 * 1024 * 1024
    assert config.server.body_memory == 4 * config.max_request_body
    assert config.server.header_timeout == 10.0


def test_overrides_and_nested_tables(tmp_path: Path) -> None:
    """A file overrides only the keys it sets, including nested tables and arrays of tables."""
    path = tmp_path / "vmm.toml"
    path.write_text(
        'address = ["tcp:0.0.0.0:1", "unix:./x.sock"]\nmax_request_body = "1MiB"\n'
        "[cvm]\naccel = \"tcg\"\n[cvm.port_mapping]\nenabled = true\n"
        'range = [{protocol = "udp", from = 5, to = 6}]\n[cvm.log]\nmax_bytes = 1000\n'
    )
    config = load_config(path)
    assert config.addresses == ("tcp:0.0.0.0:1", "unix:./x.sock")
    assert config.max_request_body == 1024 * 1024
    assert config.cvm.accel == "tcg"
    assert config.cvm.port_mapping.range[0].protocol == "udp"
    assert config.cvm.port_mapping.range[0].from_port == 5
    assert config.cvm.log.max_bytes == 1000
    assert config.cvm.kms_urls == ("http://127.0.0.1:8081",)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("adress = 'tcp:1.2.3.4:1'", "unknown key `adress`"),
        ("[cvm]\nvcpus = 2", "unknown key `cvm.vcpus`"),
        ("[cvm.log]\nmax_bytes = 'lots'", "`cvm.log.max_bytes`"),
        ("[cvm]\ncid_start = 'a'", "`cvm.cid_start`: expected an integer"),
        ("[cvm]\ncid_start = 2", "`cvm.cid_start`: must be >= 3"),
        ("[cvm]\ncid_pool_size = 0", "`cvm.cid_pool_size`: must be > 0"),
        ("[cvm]\naccel = 'hvf'", "`cvm.accel`: expected one of"),
        ("[cvm]\nqmp_socket = 1", "`cvm.qmp_socket`: expected true or false"),
        ("[cvm]\nkms_urls = ['ftp://x']", "`cvm.kms_urls[0]`"),
        ("[auth]\ntokens = 'secret'", "`auth.tokens`: expected an array"),
        ("address = 'http://x'", "`address`"),
        ("address = 'tcp:1.2.3.4:99999'", "bad port"),
        ("address = []", "at least one listen address"),
        ("metrics_address = 'http://x'", "`metrics_address`: 'http://x' is not"),
        ("grpc_address = 'tcp:1.2.3.4:99999'", "`grpc_address`: bad port"),
        ("[cvm.auto_restart]\ninitial_backoff = 500", "initial_backoff"),
        ("[cvm.port_mapping]\nrange = [{protocol='tcp', from=10, to=5}]", "range[0]"),
        ("[cvm.port_mapping]\nrange = [{protocol='sctp'}]", "range[0].protocol"),
        ("[cvm.networking]\nmode = 'bridge'", "`cvm.networking.bridge`"),
        ("[cvm.networking]\nmac_prefix = '01:02:03:04'", "mac_prefix"),
        ("[cvm.networking]\ndhcp_start = '10.0.3.1'", "dhcp_start"),
        ("[supervisor]\nsock = ''", "`supervisor.sock`"),
        ("kms_url = 5", "`kms_url`"),
        ("[server]\nheader_timeout = 0", "`server.header_timeout`: must be > 0"),
        ("[server]\nbody_timeout = -1.5", "`server.body_timeout`: must be > 0"),
        ("[server]\nbody_timeout = 'long'", "`server.body_timeout`: expected a number"),
        ("[server]\nmax_connections = 0", "`server.max_connections`: must be > 0"),
        ("[server]\nbody_memory = '1M'", "`server.body_memory`: must be at least max_request_body"),
        ("[server]\nbody_memory_wait = -1", "`server.body_memory_wait`: must be >= 0"),
        ("[cvm.port_mapping]\naddress = 'localhost'", "`cvm.port_mapping.address`: 'localhost'"),
        ("[cvm.port_mapping]\naddress = '::1'", "is not an IPv4 address"),
        ("[cvm.port_mapping]\naddress = '127.0.0.1,guestfwd=x'", "`cvm.port_mapping.address`"),
        ("[cvm]\nbackend = 'xen'", "`cvm.backend`: expected one of"),
        ("[libvirt]\nuri = ''", "`libvirt.uri`: must not be empty"),
        ("[libvirt]\ndomain_prefix = 'a/b'", "`libvirt.domain_prefix`"),
    ],
)
def test_bad_values_are_rejected_naming_the_key(tmp_path: Path, text: str, message: str) -> None:
    """Each bad key or value stops loading with a message naming that key."""
    path = tmp_path / "vmm.toml"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert message in info.value.message


def test_unreadable_and_invalid_files(tmp_path: Path) -> None:
    """A missing file or broken TOML is a config error, not a traceback."""
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("address = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("tcp:127.0.0.1:9080", ("tcp", "127.0.0.1", 9080)),
        ("TCP:127.0.0.1", ("tcp", "127.0.0.1", 8000)),
        (" tcp:[::1]:81 ", ("tcp", "::1", 81)),
        ("unix:./vmm.sock", ("unix", "./vmm.sock", 0)),
        ("unix:/run/vmm/api.sock", ("unix", "/run/vmm/api.sock", 0)),
    ],
)
def test_address_forms(address: str, expected: tuple[str, str, int]) -> None:
    """Listen addresses parse in dstack's forms, case-insensitively and trimmed."""
    assert parse_address(address) == expected


def test_configs_are_frozen() -> None:
    """Config objects cannot be changed after loading."""
    config = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.run_path = "/tmp"  # type: ignore[misc]
