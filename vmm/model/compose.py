"""The app compose document (``app-compose.json``): parsing, hashing and the app id.

The VMM stores the compose bytes verbatim; the guest hashes the same bytes, so the hash is over
the exact string the caller sent, never a re-serialisation. Only the fields the VMM reads are
type-checked; everything else belongs to the guest.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from dataclasses import dataclass
from typing import Any

from vmm.core.exceptions import InvalidField

NAME_RE = re.compile(r"^[A-Za-z0-9\-_. @~!$^()]+$")
MAX_NAME = 256
KEY_PROVIDERS = ("none", "kms", "local", "tpm")
_APP_ID_RE = re.compile(r"^[0-9a-f]{1,128}$")


@dataclass(frozen=True)
class AppCompose:
    raw: str
    document: dict[str, Any]

    @property
    def gateway_enabled(self) -> bool:
        return bool(self.document.get("gateway_enabled") or self.document.get("tproxy_enabled"))

    @property
    def key_provider(self) -> str:
        provider = self.document.get("key_provider")
        if provider:
            return str(provider)
        if self.document.get("kms_enabled"):
            return "kms"
        if self.document.get("local_key_provider_enabled"):
            return "local"
        return "none"

    @property
    def no_instance_id(self) -> bool:
        return bool(self.document.get("no_instance_id"))


def validate_name(name: str, field: str = "name") -> str:
    if not name:
        raise InvalidField(field, "is required")
    if len(name) > MAX_NAME:
        raise InvalidField(field, f"is longer than {MAX_NAME} characters")
    if not NAME_RE.match(name):
        raise InvalidField(
            field,
            f"{name!r} has characters outside A-Z a-z 0-9 and - _ . space @ ~ ! $ ^ ( )",
        )
    return name


def parse_compose(raw: str, field: str = "compose_file") -> AppCompose:
    """Parse and type-check the fields the VMM reads; raise InvalidField naming the problem."""
    if not raw.strip():
        raise InvalidField(field, "is required (a JSON app-compose document)")
    try:
        document = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise InvalidField(field, f"is not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidField(field, "is nested too deeply (arrays or objects)") from None
    except ValueError:
        # Valid JSON that int() refuses: an integer over Python's digit limit.
        limit = sys.get_int_max_str_digits()
        raise InvalidField(field, f"has an integer with more than {limit} digits") from None
    if not isinstance(document, dict):
        raise InvalidField(field, "must be a JSON object")
    _expect(document, field, "name", str)
    _expect(document, field, "runner", str)
    _expect(document, field, "docker_compose_file", str)
    _expect(document, field, "manifest_version", int)
    for flag in (
        "gateway_enabled",
        "tproxy_enabled",
        "kms_enabled",
        "local_key_provider_enabled",
        "public_logs",
        "public_sysinfo",
        "public_tcbinfo",
        "no_instance_id",
        "secure_time",
    ):
        _expect(document, field, flag, bool)
    allowed = document.get("allowed_envs")
    if allowed is not None and (
        not isinstance(allowed, list) or not all(isinstance(e, str) for e in allowed)
    ):
        raise InvalidField(f"{field}.allowed_envs", "must be an array of strings")
    provider = document.get("key_provider")
    if provider is not None and provider not in KEY_PROVIDERS:
        raise InvalidField(
            f"{field}.key_provider", f"must be one of {', '.join(KEY_PROVIDERS)}, got {provider!r}"
        )
    return AppCompose(raw=raw, document=document)


def compose_hash(raw: str) -> str:
    """SHA-256 of the exact compose bytes, 64 lowercase hex digits."""
    return hashlib.sha256(raw.encode()).hexdigest()


def app_id_for(raw: str, requested: str | None = None, field: str = "app_id") -> str:
    """The app id: the caller's (``0x`` stripped, lowercased), else the compose hash's first 40."""
    if requested:
        app_id = requested.lower().removeprefix("0x")
        if not _APP_ID_RE.match(app_id):
            raise InvalidField(field, f"{requested!r} is not a hex app id")
        return app_id
    return compose_hash(raw)[:40]


def _expect(document: dict[str, Any], field: str, key: str, kind: type) -> None:
    value = document.get(key)
    if value is None:
        return
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if not ok:
        raise InvalidField(f"{field}.{key}", f"must be a {kind.__name__}, got {value!r}")
