"""Argument parsers shared by the commands: sizes, port maps, GPUs and .env files."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _size(text: str, units: dict[str, int], what: str) -> int:
    value = text.strip().upper().removesuffix("B")
    unit = value[-1] if value and value[-1].isalpha() else ""
    number = value[:-1] if unit else value
    if unit not in units or not number.isdigit():
        suffixes = "/".join(u for u in units if u)
        raise argparse.ArgumentTypeError(
            f"bad {what} size {text!r}: a whole number, optionally with {suffixes} (e.g. 2G)")
    return int(number) * units[unit]


def size_mb(text: str) -> int:
    """Memory: a bare number is MB; M, G and T suffixes are accepted (whole numbers only)."""
    return _size(text, {"": 1, "M": 1, "G": 1024, "T": 1024 * 1024}, "memory")


def size_gb(text: str) -> int:
    """Disk: a bare number is GB; G and T suffixes are accepted (whole numbers only)."""
    return _size(text, {"": 1, "G": 1, "T": 1024}, "disk")


def size_bytes(text: str) -> int:
    """Swap: a bare number is MB (as dstack's --swap); K, M, G and T suffixes scale."""
    return _size(text, {"": 2**20, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}, "swap")


def port(text: str) -> dict[str, Any]:
    """``proto[:addr]:host:vm``; the address defaults to 127.0.0.1, as in dstack's vmm-cli."""
    parts = text.split(":")
    if len(parts) not in (3, 4) or parts[0] not in ("tcp", "udp"):
        raise argparse.ArgumentTypeError(f"bad port {text!r}: use proto[:addr]:host:vm")
    address = parts[1] if len(parts) == 4 else "127.0.0.1"
    try:
        host, vm = int(parts[-2]), int(parts[-1])
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad port numbers in {text!r}") from None
    if not (0 < host < 65536 and 0 < vm < 65536):
        raise argparse.ArgumentTypeError(f"bad port {text!r}: ports are 1-65535")
    return {"protocol": parts[0], "host_address": address, "host_port": host, "vm_port": vm}


def gpu_config(slots: list[str], attach_all: bool) -> dict[str, Any] | None:
    """``--gpu SLOT`` (repeatable) or ``--gpu all`` / ``--ppcie``: the GpuConfig, or None."""
    if attach_all or "all" in slots:
        return {"attach_mode": "all", "gpus": []}
    if slots:
        return {"attach_mode": "listed", "gpus": [{"slot": s} for s in slots]}
    return None


def parse_env_file(path: Path) -> dict[str, str]:
    """``KEY=VALUE`` lines (``export`` and surrounding quotes allowed, ``#`` comments).

    A line that is not one of those is an error naming the line: dstack's vmm-cli silently
    encrypted zero variables from such a file (its issue #832).
    """
    try:
        text = path.read_text()
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot read env file {path}: {exc}") from None
    env: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.removeprefix("export ").partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not ENV_KEY.match(key):
            raise argparse.ArgumentTypeError(
                f"{path}:{number}: expected KEY=VALUE with KEY matching {ENV_KEY.pattern}")
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        env[key] = value
    return env
