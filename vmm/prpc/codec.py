"""The pRPC codec: protobuf messages to and from dstack's JSON, query strings and binary.

dstack's JSON is serde over prost types, which differs from protobuf's canonical JSON mapping
(``json_format``): field names stay snake_case, ``bytes`` are lowercase hex (``0x`` accepted on
input), 64-bit integers are plain numbers, absent optional and message fields are ``null``, a
missing key takes its default, an unknown key is ignored, and ``null`` for a plain scalar is an
error. So this module walks the descriptors itself instead of using ``json_format``.

Every decoding error is an ``InvalidField`` naming the field path (``ports[0].host_port``) and the
reason, so a caller sees exactly what to fix.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import parse_qsl

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError as ProtobufDecodeError
from google.protobuf.message import Message

from vmm.core.exceptions import DecodeError, InvalidField

EMPTY_FULL_NAME = "google.protobuf.Empty"

_INT_RANGES: dict[int, tuple[str, int, int]] = {
    FieldDescriptor.TYPE_INT32: ("int32", -(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: ("int32", -(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: ("int32", -(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_UINT32: ("uint32", 0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: ("uint32", 0, 2**32 - 1),
    FieldDescriptor.TYPE_INT64: ("int64", -(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: ("int64", -(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: ("int64", -(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT64: ("uint64", 0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: ("uint64", 0, 2**64 - 1),
}
_FLOATS = (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE)
# More significant digits than any 64-bit integer has: such a number is out of range unconverted.
_MAX_INT_DIGITS = 20
_ASCII_INT = re.compile(r"[+-]?[0-9]+")
_ASCII_DIGITS = re.compile(r"[0-9]+")
# GET query keys: the protos nest a handful of levels, and a list index is bounded so a key
# such as ids[99999999] is refused rather than taken for the first item.
MAX_QUERY_DEPTH = 16
MAX_QUERY_INDEX = 10_000


# ---------------------------------------------------------------------------------------------
# Encoding


def to_json_value(message: Message) -> Any:
    """Return the JSON-ready value of a message (``None`` for ``Empty``)."""
    if message.DESCRIPTOR.full_name == EMPTY_FULL_NAME:
        return None
    return _message_to_dict(message)


def to_json_bytes(message: Message) -> bytes:
    """Encode a message as compact JSON bytes, as dstack answers a successful call."""
    return json.dumps(to_json_value(message), separators=(",", ":"), ensure_ascii=False).encode()


@dataclass(frozen=True)
class Encoded:
    """A reply that arrives already encoded, in both encodings, for the bridge to send as is.

    For large replies assembled from parts encoded earlier (Status: one cached part per VM).
    ``json`` and ``protobuf`` are called only for the encoding the caller asked for. They must
    produce exactly what ``to_json_bytes`` / ``SerializeToString`` would for a ``message_class``
    message, up to the order of repeated items' bytes which protobuf allows.
    """

    message_class: type[Message]
    json: Callable[[], bytes]
    protobuf: Callable[[], bytes]

    @classmethod
    def constant(cls, message: Message) -> Encoded:
        """A reply that never changes (Version), encoded once in both encodings."""
        as_json, as_protobuf = to_json_bytes(message), message.SerializeToString()
        return cls(type(message), lambda: as_json, lambda: as_protobuf)


def to_json_with_items(envelope: Message, field: str, items: list[bytes]) -> bytes:
    """``envelope`` as JSON with repeated ``field`` set to ``items`` (each one item's JSON).

    The envelope is encoded with the field at ``null``, then the first ``"field":null`` (the
    key: a string value cannot hold an unescaped quote) is replaced by the list.
    """
    out = to_json_value(envelope)
    out[field] = None
    text = json.dumps(out, separators=(",", ":"), ensure_ascii=False).encode()
    marker = b'"' + field.encode() + b'":null'
    return text.replace(marker, marker[:-4] + b"[" + b",".join(items) + b"]", 1)


# How a field's value becomes JSON: as is, a nested message, hex bytes, or a float that may be NaN.
_AS_IS, _NESTED, _HEX, _FLOAT = range(4)


class _Plan:
    """Per message type: every field at its JSON default, and how to convert a set field.

    Encoding starts from the defaults and converts only the fields ``ListFields`` reports as set
    (a C call), instead of reading every field through the descriptor: Status with 1,000 VMs is
    mostly unset fields, and this is what keeps it fast.
    """

    __slots__ = ("defaults", "kinds", "repeated")

    def __init__(self, descriptor: Descriptor) -> None:
        self.defaults: dict[str, Any] = {}
        self.kinds: dict[str, tuple[int, bool]] = {}
        repeated = []
        for field in descriptor.fields:
            kind = (_NESTED if field.type == FieldDescriptor.TYPE_MESSAGE
                    else _HEX if field.type == FieldDescriptor.TYPE_BYTES
                    else _FLOAT if field.type in _FLOATS else _AS_IS)
            self.kinds[field.name] = (kind, field.is_repeated)
            if field.is_repeated:
                self.defaults[field.name] = None  # replaced by a fresh list per message
                repeated.append(field.name)
            elif field.has_presence:
                self.defaults[field.name] = None
            else:
                self.defaults[field.name] = _convert(kind, field.default_value)
        self.repeated = tuple(repeated)


_PLANS: dict[Descriptor, _Plan] = {}


def _message_to_dict(message: Message) -> dict[str, Any]:
    descriptor = _descriptor(message)
    plan = _PLANS.get(descriptor)
    if plan is None:
        plan = _PLANS[descriptor] = _Plan(descriptor)
    out = plan.defaults.copy()
    for name in plan.repeated:
        out[name] = []
    kinds = plan.kinds
    for field, value in message.ListFields():
        name = field.name
        kind, repeated = kinds[name]
        if repeated:
            if kind == _NESTED:
                out[name] = [_message_to_dict(item) for item in value]
            elif kind == _AS_IS:
                out[name] = list(value)
            else:
                out[name] = [_convert(kind, item) for item in value]
        elif kind == _NESTED:
            out[name] = _message_to_dict(value)
        elif kind == _AS_IS:
            out[name] = value
        else:
            out[name] = _convert(kind, value)
    return out


def _convert(kind: int, value: Any) -> Any:
    if kind == _HEX:
        return bytes(value).hex()
    if kind == _FLOAT and not math.isfinite(value):
        # JSON has no NaN/Infinity; serde_json writes null for them.
        return None
    return value


# ---------------------------------------------------------------------------------------------
# Decoding


def from_json_bytes(body: bytes, message_class: type[Message]) -> Message:
    """Decode a JSON request body. An empty body or ``null`` is the default message."""
    if body == b"{}" or not body.strip():  # the usual body of a call without arguments
        return message_class()
    try:
        value = _loads(body)
    except RecursionError:
        raise DecodeError("malformed JSON body: arrays or objects are nested too deeply") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DecodeError(f"malformed JSON body: {exc}") from None
    return from_json_value(value, message_class)


@dataclass(frozen=True)
class _LongInteger:
    """A JSON integer with more digits than Python converts (4,300); only its length is kept."""

    digits: int


def _loads(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise
    except ValueError:
        # Only int() refuses valid JSON: an integer over Python's digit limit. Parse again with
        # such integers kept as their length, so the field they land in can be named (or an
        # unknown key holding one ignored).
        return json.loads(body, parse_int=_int_or_long)


def _int_or_long(text: str) -> int | _LongInteger:
    try:
        return int(text)
    except ValueError:
        return _LongInteger(len(text.lstrip("-")))


def from_json_value(value: Any, message_class: type[Message]) -> Message:
    """Build a message from an already-parsed JSON value."""
    message = message_class()
    if message.DESCRIPTOR.full_name == EMPTY_FULL_NAME or value is None:
        return message
    _fill_message(message, value, path="", from_query=False)
    return message


def from_query_string(query: str, message_class: type[Message]) -> Message:
    """Build a message from a GET query string, serde_qs style (``a[b][0]=x``).

    Values arrive as strings and are converted by the field's type. Keys that name no field
    (``json``, ``token``) are ignored like any unknown key.
    """
    message = message_class()
    if message.DESCRIPTOR.full_name == EMPTY_FULL_NAME:
        return message
    tree = _parse_query_tree(query)
    _fill_message(message, tree, path="", from_query=True)
    return message


def from_protobuf_bytes(body: bytes, message_class: type[Message]) -> Message:
    """Decode a binary protobuf body. Unknown fields are skipped; empty is the default."""
    message = message_class()
    try:
        message.ParseFromString(body)
    except ProtobufDecodeError as exc:
        name = message.DESCRIPTOR.name
        hint = ""
        if body.lstrip()[:1] in (b"{", b"["):
            # curl -d sends form content-type: JSON then arrives where protobuf is expected.
            hint = ("; the body looks like JSON: add ?json to the URL or send "
                    "Content-Type: application/json")
        raise DecodeError(f"malformed protobuf body for {name}: {exc}{hint}") from None
    # prost drops what it does not know; so do we, so nothing unknown is ever re-encoded.
    message.DiscardUnknownFields()
    return message


# A singular field that takes a JSON value as is when it has the plain type: a string, an
# integer (range-checked), a bool. Anything else takes the general path, which also words errors.
_TAKES_STR, _TAKES_INT, _TAKES_BOOL, _GENERAL = range(4)
# Per message type: JSON key -> (field, how it takes a value, lowest and highest integer).
_DecodePlan = dict[str, tuple[FieldDescriptor, int, int, int]]
_DECODE_PLANS: dict[Descriptor, _DecodePlan] = {}


def _decode_plan(descriptor: Descriptor) -> _DecodePlan:
    plan: _DecodePlan = {}
    for field in descriptor.fields:
        takes, low, high = _GENERAL, 0, 0
        if not field.is_repeated:
            if field.type == FieldDescriptor.TYPE_STRING:
                takes = _TAKES_STR
            elif field.type == FieldDescriptor.TYPE_BOOL:
                takes = _TAKES_BOOL
            elif field.type in _INT_RANGES:
                takes = _TAKES_INT
                _, low, high = _INT_RANGES[field.type]
        plan[field.name] = (field, takes, low, high)
    return plan


def _fill_message(message: Message, value: Any, path: str, *, from_query: bool) -> None:
    descriptor = _descriptor(message)
    if not isinstance(value, dict):
        reason = f"expected a JSON object for {descriptor.name}, got {_json_type(value)}"
        if path:
            raise InvalidField(path, reason)
        raise DecodeError(f"the request body must be a JSON object: {reason}")
    plan = _DECODE_PLANS.get(descriptor)
    if plan is None:
        plan = _DECODE_PLANS[descriptor] = _decode_plan(descriptor)
    for key, item in value.items():
        entry = plan.get(key)
        if entry is None:
            continue
        field, takes, low, high = entry
        # The common case, decided without building the field's path (guest answers are mostly
        # plain strings and integers): exactly what ``_scalar`` would accept and return.
        if not from_query and (
            (takes == _TAKES_STR and type(item) is str and item.isascii())
            or (takes == _TAKES_INT and type(item) is int and low <= item <= high)
            or (takes == _TAKES_BOOL and type(item) is bool)
        ):
            setattr(message, field.name, item)
            continue
        field_path = f"{path}.{key}" if path else key
        _fill_field(message, field, item, field_path, from_query=from_query)


def _fill_field(
    message: Message, field: FieldDescriptor, value: Any, path: str, *, from_query: bool
) -> None:
    if field.is_repeated:
        if from_query and not isinstance(value, list):
            value = [value]
        if not isinstance(value, list):
            raise InvalidField(path, f"expected an array, got {_json_type(value)}")
        container = getattr(message, field.name)
        for index, item in enumerate(value):
            item_path = f"{path}[{index}]"
            if field.type == FieldDescriptor.TYPE_MESSAGE:
                if item is None:
                    raise InvalidField(item_path, "expected an object, got null")
                _fill_message(container.add(), item, item_path, from_query=from_query)
            else:
                container.append(_scalar(field, item, item_path, from_query=from_query))
        return
    if value is None:
        if field.has_presence:
            return  # an absent optional or message field
        raise InvalidField(path, f"null is not a valid {_type_name(field)}")
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        child = getattr(message, field.name)
        child.SetInParent()
        _fill_message(child, value, path, from_query=from_query)
        return
    setattr(message, field.name, _scalar(field, value, path, from_query=from_query))


def _scalar(field: FieldDescriptor, value: Any, path: str, *, from_query: bool) -> Any:
    kind = field.type
    if from_query and isinstance(value, str):
        value = _coerce_query_scalar(field, value, path)
    if kind == FieldDescriptor.TYPE_STRING:
        if not isinstance(value, str):
            raise InvalidField(path, f"expected a string, got {_json_type(value)}")
        return _unicode_text(value, path)
    if kind == FieldDescriptor.TYPE_BOOL:
        if not isinstance(value, bool):
            raise InvalidField(path, f"expected true or false, got {_json_type(value)}")
        return value
    if kind == FieldDescriptor.TYPE_BYTES:
        return _hex_bytes(value, path)
    if kind in _INT_RANGES:
        name, low, high = _INT_RANGES[kind]
        if isinstance(value, _LongInteger):
            raise InvalidField(path, f"an integer of {value.digits} digits is out of range for {name}")
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidField(path, f"expected an integer ({name}), got {_json_type(value)}")
        if not low <= value <= high:
            raise InvalidField(path, f"{value} is out of range for {name} ({low}..{high})")
        return value
    if kind in _FLOATS:
        if isinstance(value, _LongInteger):
            raise InvalidField(path, f"an integer of {value.digits} digits is out of range")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidField(path, f"expected a number, got {_json_type(value)}")
        return float(value)
    raise InvalidField(path, f"unsupported field type {kind}")  # no enums in these protos


def _unicode_text(value: str, path: str) -> str:
    """``value`` if it can be UTF-8 (protobuf's string type); a lone surrogate cannot."""
    if not value.isascii():
        try:
            value.encode()
        except UnicodeEncodeError as exc:
            raise InvalidField(
                path,
                f"contains a lone surrogate {value[exc.start]!r} at index {exc.start}, "
                "which is not Unicode text",
            ) from None
    return value


def _coerce_query_scalar(field: FieldDescriptor, text: str, path: str) -> Any:
    kind = field.type
    if kind == FieldDescriptor.TYPE_BOOL:
        if text in ("true", "false"):
            return text == "true"
        raise InvalidField(path, f"expected true or false, got {text!r}")
    if kind in _INT_RANGES:
        if not _ASCII_INT.fullmatch(text):
            raise InvalidField(path, f"expected an integer, got {_shown(text)}")
        digits = len(text.lstrip("+-").lstrip("0"))
        if digits > _MAX_INT_DIGITS:
            name = _INT_RANGES[kind][0]
            raise InvalidField(path, f"an integer of {digits} digits is out of range for {name}")
        return int(text, 10)
    if kind in _FLOATS:
        try:
            return float(text)
        except ValueError:
            raise InvalidField(path, f"expected a number, got {_shown(text)}") from None
    return text


def _shown(text: str) -> str:
    """``text`` quoted for an error message, cut so a message never echoes a whole request."""
    return repr(text[:64]) + ("..." if len(text) > 64 else "")


def _hex_bytes(value: Any, path: str) -> bytes:
    if not isinstance(value, str):
        raise InvalidField(path, f"expected a hex string, got {_json_type(value)}")
    text = value
    while text[:2] in ("0x", "0X"):
        text = text[2:]
    if len(text) % 2:
        raise InvalidField(path, "hex string has an odd number of digits")
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise InvalidField(path, f"not a hex string: {value[:64]!r}") from None


def _parse_query_tree(query: str) -> Any:
    """Turn ``a=1&b[c]=2&d[0]=x&d[1]=y`` into nested dicts and lists of strings."""
    root: dict[str, Any] = {}
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=False)
    except ValueError as exc:
        raise DecodeError(f"malformed query string: {exc}") from None
    for raw_key, raw_value in pairs:
        segments = _key_segments(raw_key)
        _check_query_key(segments)
        node: dict[str, Any] = root
        for segment in segments[:-1]:
            child = node.get(segment)
            if not isinstance(child, dict):
                child = {}
                node[segment] = child
            node = child
        last = segments[-1]
        if last in node and not isinstance(node[last], dict):
            existing = node[last]
            node[last] = [*existing, raw_value] if isinstance(existing, list) else [
                existing,
                raw_value,
            ]
        else:
            node[last] = raw_value
    return _lists_from_index_dicts(root)


def _key_segments(key: str) -> list[str]:
    head, bracket, rest = key.partition("[")
    segments = [head]
    if bracket:
        for part in rest.split("["):
            segments.append(part.rstrip("]"))
    return segments


def _check_query_key(segments: list[str]) -> None:
    """Refuse keys nested past MAX_QUERY_DEPTH or with a list index past MAX_QUERY_INDEX."""
    if len(segments) > MAX_QUERY_DEPTH:
        raise InvalidField(
            segments[0][:64],
            f"query key nests {len(segments)} levels deep (at most {MAX_QUERY_DEPTH})",
        )
    for depth, segment in enumerate(segments[1:], start=1):
        if not _ASCII_DIGITS.fullmatch(segment):
            continue
        short = len(segment) <= _MAX_INT_DIGITS
        if not short or int(segment) > MAX_QUERY_INDEX:
            field = segments[0] + "".join(f"[{s}]" for s in segments[1:depth])
            index = segment if short else f"of {len(segment)} digits"
            raise InvalidField(field, f"list index {index} is over {MAX_QUERY_INDEX}")


def _lists_from_index_dicts(node: Any) -> Any:
    if not isinstance(node, dict):
        return node
    converted = {key: _lists_from_index_dicts(value) for key, value in node.items()}
    if converted and all(key == "" or _ASCII_DIGITS.fullmatch(key) for key in converted):
        items: list[Any] = []
        ordered = sorted(converted.items(), key=lambda kv: int(kv[0]) if kv[0] else -1)
        for _, value in ordered:
            items.extend(value if isinstance(value, list) else [value])
        return items
    return converted


def _descriptor(message: Message) -> Descriptor:
    # The C (upb) descriptor types are stubbed separately from the Python ones; same API.
    return cast(Descriptor, message.DESCRIPTOR)


def _type_name(field: FieldDescriptor) -> str:
    if field.type in _INT_RANGES:
        return _INT_RANGES[field.type][0]
    return {
        FieldDescriptor.TYPE_STRING: "string",
        FieldDescriptor.TYPE_BOOL: "bool",
        FieldDescriptor.TYPE_BYTES: "bytes (hex string)",
    }.get(field.type, "number")


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, _LongInteger):
        return f"a number of {value.digits} digits"
    if isinstance(value, int | float):
        return f"a number ({value!r})"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__
