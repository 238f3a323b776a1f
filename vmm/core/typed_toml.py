"""Turn parsed TOML tables into frozen dataclasses, strictly.

Unknown keys and values of the wrong type are rejected with the dotted key name, so a typo in
vmm.toml stops the daemon at start instead of being silently ignored. Supported field types:
str, int, float, bool, Literal[...], ``Size`` (a byte count written as ``"4M"`` or an integer),
lists of those, nested dataclasses and lists of dataclasses, and ``X | None``.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from typing import Annotated, Any, Literal, TypeVar, get_args, get_origin, get_type_hints

from vmm.core.exceptions import ConfigError

T = TypeVar("T")


class _SizeMarker:
    """Marks an int field that also accepts human sizes like "4M" or "10MiB"."""


Size = Annotated[int, _SizeMarker()]

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def parse_size(value: object, key: str) -> int:
    """Parse a byte count: an integer, or a string such as ``"4M"``, ``"10MiB"``, ``"512K"``."""
    if isinstance(value, bool):
        raise ConfigError(f"`{key}`: expected a size such as \"4M\" or an integer, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"`{key}`: a size cannot be negative ({value})")
        return value
    if isinstance(value, str):
        match = _SIZE_RE.match(value)
        if match:
            return int(match.group(1)) * _UNITS[match.group(2).lower()]
    raise ConfigError(f"`{key}`: expected a size such as \"4M\" or an integer, got {value!r}")


def build(cls: type[T], table: object, prefix: str = "") -> T:
    """Build dataclass ``cls`` from a TOML table, rejecting unknown keys."""
    if not isinstance(table, dict):
        raise ConfigError(f"`{prefix or 'config'}`: expected a table, got {_kind(table)}")
    assert dataclasses.is_dataclass(cls)
    hints = get_type_hints(cls, include_extras=True)
    fields = {_toml_name(f): f for f in dataclasses.fields(cls)}
    unknown = sorted(set(table) - set(fields))
    if unknown:
        known = ", ".join(sorted(fields))
        raise ConfigError(
            f"unknown key `{_join(prefix, unknown[0])}` (known keys here: {known})"
        )
    kwargs: dict[str, Any] = {}
    for name, value in table.items():
        field = fields[name]
        kwargs[field.name] = _convert(hints[field.name], value, _join(prefix, name))
    return cls(**kwargs)


def _toml_name(field: dataclasses.Field[Any]) -> str:
    return str(field.metadata.get("toml", field.name))


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _convert(hint: Any, value: Any, key: str) -> Any:
    origin = get_origin(hint)
    if origin is Annotated:
        base, *extras = get_args(hint)
        if any(isinstance(extra, _SizeMarker) for extra in extras):
            return parse_size(value, key)
        return _convert(base, value, key)
    if origin in (typing.Union, types.UnionType):
        options = [arg for arg in get_args(hint) if arg is not type(None)]
        errors = []
        for option in options:
            try:
                return _convert(option, value, key)
            except ConfigError as exc:
                errors.append(exc.message)
        raise ConfigError(errors[0] if len(errors) == 1 else f"`{key}`: {'; or '.join(errors)}")
    if origin is Literal:
        allowed = get_args(hint)
        if value not in allowed:
            choices = ", ".join(repr(a) for a in allowed)
            raise ConfigError(f"`{key}`: expected one of {choices}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise ConfigError(f"`{key}`: expected an array, got {_kind(value)}")
        (item_hint, *_) = get_args(hint)
        return tuple(_convert(item_hint, item, f"{key}[{i}]") for i, item in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"`{key}`: expected a table, got {_kind(value)}")
        _, value_hint = get_args(hint)
        return {str(k): _convert(value_hint, v, f"{key}.{k}") for k, v in value.items()}
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return build(hint, value, key)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"`{key}`: expected true or false, got {_kind(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"`{key}`: expected an integer, got {_kind(value)}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"`{key}`: expected a number, got {_kind(value)}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"`{key}`: expected a string, got {_kind(value)}")
        return value
    raise TypeError(f"unsupported config type {hint!r} for {key}")  # a bug in the schema


def _kind(value: object) -> str:
    if isinstance(value, bool):
        return f"a boolean ({value})"
    if isinstance(value, int | float):
        return f"a number ({value})"
    if isinstance(value, str):
        return f"a string ({value!r})"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return type(value).__name__
