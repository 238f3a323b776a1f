"""The one rule for names that become paths: image names, VM ids, supervisor ids, bridge names.

A caller-supplied name is joined to a root directory (images, VM work directories, the
supervisor's table, /sys/class/net) and then read, written or deleted. ``"."`` joined to a root
*is* the root, so a name check that only looks at characters lets ``DeleteImage {"id": "."}``
delete every image. Every such name therefore passes ``check_name`` (a single path component:
not empty, not ``.`` or ``..``, no separator, NUL or newline, bounded length, and the kind's
character set), and ``child_of`` proves the joined path lies directly inside its root before it
is used, so a symlink planted in the root cannot lead elsewhere either.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from vmm.core.exceptions import InvalidField


@dataclass(frozen=True)
class NameRule:
    """What one kind of name may contain: a character class and a maximum length."""

    chars: re.Pattern[str]
    allowed: str  # the character set in words, for error messages
    max_len: int


VM_ID = NameRule(re.compile(r"[A-Za-z0-9_-]+"), "A-Z a-z 0-9 _ -", 64)
IMAGE_NAME = NameRule(re.compile(r"[A-Za-z0-9_.-]+"), "A-Z a-z 0-9 _ . -", 64)
# Linux interface names: at most 15 bytes (IFNAMSIZ - 1), never '/', ':' or whitespace.
IFNAME = NameRule(re.compile(r"[A-Za-z0-9_.-]+"), "A-Z a-z 0-9 _ . -", 15)


def check_name(name: str, field: str, rule: NameRule = VM_ID) -> str:
    """Return ``name`` if it is one safe path component under ``rule``; else InvalidField."""
    if not name:
        raise InvalidField(field, "is required")
    shown = repr(name[:80]) + ("..." if len(name) > 80 else "")
    if len(name) > rule.max_len:
        raise InvalidField(field, f"{shown} is longer than {rule.max_len} characters")
    if name in {".", ".."}:
        raise InvalidField(field, f"{shown} is not a name")
    if any(c in name for c in "/\\\0\n\r"):
        raise InvalidField(field, f"{shown} contains a path separator or control character")
    if not rule.chars.fullmatch(name):
        raise InvalidField(field, f"{shown} has characters outside {rule.allowed}")
    return name


def is_valid_name(name: str, rule: NameRule = VM_ID) -> bool:
    try:
        check_name(name, "name", rule)
    except InvalidField:
        return False
    return True


def child_of(root: Path, name: str, field: str, rule: NameRule = VM_ID) -> Path:
    """``root / name`` once ``name`` is proven safe and the path resolves directly inside root.

    The resolved path must be a direct child of the resolved root, so a name that is a symlink
    to somewhere else is refused too: nothing outside the root is read, written or deleted.
    """
    check_name(name, field, rule)
    path = root / name
    try:
        inside = path.resolve().parent == root.resolve()
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop, before Python 3.13
        raise InvalidField(field, f"{name!r} cannot be resolved: {exc}") from None
    if not inside:
        raise InvalidField(field, f"{name!r} does not name an entry inside its directory")
    return path
