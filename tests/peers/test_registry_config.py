"""``[image] registry`` and its options: parsed strictly, each error naming its key."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmm.core.config import ImageConfig, RegistryRef, parse_config, parse_registry, validate
from vmm.core.exceptions import ConfigError


@pytest.mark.parametrize(("text", "ref"), [
    ("registry.example.com/dstack/guest", RegistryRef("registry.example.com", None, "dstack/guest")),
    ("127.0.0.1:5000/guest", RegistryRef("127.0.0.1", 5000, "guest")),
    ("[::1]:5000/a/b-c.d_e", RegistryRef("::1", 5000, "a/b-c.d_e")),
    ("localhost/x", RegistryRef("localhost", None, "x")),
])
def test_registry_references_parse(text: str, ref: RegistryRef) -> None:
    """host[:port]/repo splits into where to connect and which repository, IPv6 in brackets."""
    assert parse_registry(text) == ref
    assert parse_registry(text).netloc == text.split("/", 1)[0]


@pytest.mark.parametrize(("text", "reason"), [
    ("example.com", "is not \"host[:port]/repository\""),
    ("https://example.com/x", "is not \"host[:port]/repository\""),
    ("example.com:99999/x", "port 99999 is out of range"),
    ("example.com/UPPER", "must be lowercase path components"),
    ("example.com/a//b", "must be lowercase path components"),
    ("example.com/../x", "must be lowercase path components"),
])
def test_bad_registry_references_name_the_key(text: str, reason: str) -> None:
    """A malformed registry is a ConfigError naming `image.registry` and what is wrong."""
    with pytest.raises(ConfigError) as caught:
        parse_registry(text)
    assert str(caught.value).startswith("`image.registry`: ")
    assert reason in str(caught.value)


def config_with(image: dict[str, object]) -> None:
    validate(parse_config({"image": image}))


def test_plain_http_only_for_loopback(tmp_path: Path) -> None:
    """Plain http is accepted for 127.0.0.0/8, ::1 and localhost, refused for anything else."""
    for host in ("127.0.0.1:5000", "127.3.4.5", "[::1]:80", "localhost:5000"):
        config_with({"registry": f"{host}/x", "registry_plain_http": True})
    with pytest.raises(ConfigError, match=r"^`image\.registry_plain_http`: .* not '10\.1\.2\.3'"):
        config_with({"registry": "10.1.2.3:5000/x", "registry_plain_http": True})


def test_ca_file_must_exist(tmp_path: Path) -> None:
    """A CA file that does not exist is refused at start, naming the key and the path."""
    missing = tmp_path / "nope.pem"
    with pytest.raises(ConfigError, match=rf"^`image\.registry_ca_file`: {missing} is not a file"):
        config_with({"registry": "example.com/x", "registry_ca_file": str(missing)})
    (tmp_path / "ca.pem").write_text("")
    config_with({"registry": "example.com/x", "registry_ca_file": str(tmp_path / "ca.pem")})
    assert ImageConfig().registry_plain_http is False
