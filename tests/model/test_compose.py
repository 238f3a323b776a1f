"""Compose parsing, hashing and app ids."""

from __future__ import annotations

import hashlib

import pytest

from vmm.core.exceptions import InvalidField
from vmm.model.compose import app_id_for, compose_hash, parse_compose, validate_name


def test_hash_and_app_id_follow_the_exact_bytes() -> None:
    """The hash is sha256 of the exact string; the app id is its first 40 hex digits."""
    raw = '{"runner": "docker-compose"}'
    assert compose_hash(raw) == hashlib.sha256(raw.encode()).hexdigest()
    assert app_id_for(raw) == compose_hash(raw)[:40]
    assert compose_hash(raw) != compose_hash('{"runner":"docker-compose"}')


def test_requested_app_id_is_normalised() -> None:
    """A caller's app id loses 0x and is lowercased; a non-hex one is refused."""
    assert app_id_for("{}", "0xABCdef") == "abcdef"
    with pytest.raises(InvalidField, match="app_id"):
        app_id_for("{}", "not-hex")


@pytest.mark.parametrize("name", ["my-app", "a.b_c d@e~f!g$h^i(j)", "x"])
def test_valid_names(name: str) -> None:
    """Names of the documented character set are accepted."""
    assert validate_name(name) == name


@pytest.mark.parametrize("name", ["", "a/b", "a\nb", "naïve", "a;b", "x" * 257])
def test_invalid_names(name: str) -> None:
    """Other characters, empty and overlong names are refused naming the field."""
    with pytest.raises(InvalidField, match="`name`"):
        validate_name(name)


def test_key_provider_resolution() -> None:
    """key_provider wins, then kms_enabled, then local_key_provider_enabled, else none."""
    assert parse_compose('{"key_provider": "tpm", "kms_enabled": true}').key_provider == "tpm"
    assert parse_compose('{"kms_enabled": true}').key_provider == "kms"
    assert parse_compose('{"local_key_provider_enabled": true}').key_provider == "local"
    assert parse_compose("{}").key_provider == "none"
    assert parse_compose('{"tproxy_enabled": true}').gateway_enabled


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ("", "compose_file"),
        ("{", "compose_file"),
        ("[]", "compose_file"),
        ('{"manifest_version": "2"}', "compose_file.manifest_version"),
        ('{"manifest_version": true}', "compose_file.manifest_version"),
        ('{"allowed_envs": "A"}', "compose_file.allowed_envs"),
        ('{"runner": 1}', "compose_file.runner"),
    ],
)
def test_bad_composes_name_the_field(raw: str, field: str) -> None:
    """A compose that is not JSON, not an object, or mistyped is refused naming the field."""
    with pytest.raises(InvalidField) as info:
        parse_compose(raw)
    assert info.value.field == field


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("[" * 3000 + "]" * 3000, "is nested too deeply"),
        ('{"services": ' + '{"a": ' * 3000 + "1" + "}" * 3001, "is nested too deeply"),
        ('{"manifest_version": ' + "9" * 5000 + "}", "has an integer with more than 4300 digits"),
        ('{"x": [-' + "1" * 4301 + "]}", "has an integer with more than 4300 digits"),
    ],
)
def test_composes_too_deep_or_with_huge_integers_name_the_field(raw: str, reason: str) -> None:
    """Nesting thousands deep or a 5,000-digit integer is an InvalidField, not a 500."""
    with pytest.raises(InvalidField) as info:
        parse_compose(raw)
    assert info.value.field == "compose_file"
    assert reason in info.value.reason
