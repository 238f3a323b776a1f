"""The checklist: fixed requests every fuzz run sends before the generated ones.

Random examples find new failures; the checklist makes sure every run, however short, sends the
inputs that broke daemons like this one before: each field (nested ones too) of each seed set
to a value that means something to a path, a parser or QEMU, then the seeds themselves, plus a
few bodies only a decoder sees. Derived from the descriptors like the strategies: a new field
or RPC is on the checklist without an edit.
"""

from __future__ import annotations

from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message_factory import GetMessageClass

from tests.support.fuzz_protobuf import length_delimited
from tests.support.fuzz_strategies import (
    EMPTY_FULL_NAME,
    HUGE_DIGITS,
    INT_BOUNDS,
    MAX_DEPTH,
    MAX_QUERY,
    Corpus,
    RawJson,
    deep_array,
    deep_object,
    dump_json,
    encode_query,
    message_type_of,
    query_pairs,
)
from vmm.prpc import codec

STRING_POISONS = (
    ".", "..", "a/b", "a\nb",  # a name that becomes a path: the root itself, its parent, a subdir
    "\ud800",  # a lone surrogate: valid JSON escape, not encodable as UTF-8
    "fe80::1%x,hostfwd=tcp::1-:2",  # an address Python accepts that carries QEMU option text
    deep_object(2_000), HUGE_DIGITS,  # for fields that hold JSON (compose): depth, digit limit
)
BYTES_POISONS = ("zz", "0x", "\ud800")
MESSAGE_POISONS: tuple[Any, ...] = (None, [], RawJson(deep_array(5_000)))
CHECKLIST_JSON_BODIES = (b'{"id":"\xff"}', b'"x"', deep_array(100_000).encode(),
                         deep_object(5_000).encode(), HUGE_DIGITS.encode())


def _poisons(field_: FieldDescriptor) -> tuple[Any, ...]:
    if field_.type == FieldDescriptor.TYPE_MESSAGE:
        return MESSAGE_POISONS
    if field_.type == FieldDescriptor.TYPE_STRING:
        return STRING_POISONS
    if field_.type == FieldDescriptor.TYPE_BYTES:
        return BYTES_POISONS
    if field_.type == FieldDescriptor.TYPE_BOOL:
        return ("true", 1)
    if field_.type in INT_BOUNDS:
        low, high = INT_BOUNDS[field_.type]
        return (low - 1, high + 1, RawJson(HUGE_DIGITS))
    return (RawJson("1e400"), "1")


def poisoned(descriptor: Descriptor, value: dict[str, Any], depth: int = 0) -> list[dict[str, Any]]:
    """Copies of ``value`` with one field (nested ones too) set to a poison value.

    A seed's own fields are poisoned; a value with no fields (no seed) has all of its type's.
    """
    out: list[dict[str, Any]] = []
    for field_ in descriptor.fields:
        if value and field_.name not in value:
            continue
        for poison in _poisons(field_):
            item = [poison] if field_.is_repeated and field_.type != FieldDescriptor.TYPE_MESSAGE \
                else poison
            out.append({**value, field_.name: item})
        if field_.type != FieldDescriptor.TYPE_MESSAGE or depth >= MAX_DEPTH - 1:
            continue
        current = value.get(field_.name)
        if field_.is_repeated:
            first = current[0] if isinstance(current, list) and current else {}
            rest = current[1:] if isinstance(current, list) else []
            out += [{**value, field_.name: [inner, *rest]}
                    for inner in poisoned(message_type_of(field_), first, depth + 1)]
        else:
            out += [{**value, field_.name: inner}
                    for inner in poisoned(message_type_of(field_), current or {}, depth + 1)]
    return out


def checklist_values(descriptor: Descriptor, corpus: Corpus) -> list[dict[str, Any]]:
    if descriptor.full_name == EMPTY_FULL_NAME:
        return [{"unknown": RawJson(deep_array(5_000))}]
    values: list[dict[str, Any]] = []
    seeds = corpus.seeds_for(descriptor)
    for seed in seeds or ({},):
        values += poisoned(descriptor, seed)
    # The seeds as they are come last, so the poisons meet the fixtures before a seed acts.
    return [*values, *seeds]


def checklist_json(descriptor: Descriptor, corpus: Corpus) -> list[bytes]:
    bodies = [dump_json(v, ascii_only=True).encode() for v in checklist_values(descriptor, corpus)]
    return [*bodies, *CHECKLIST_JSON_BODIES]


def checklist_queries(descriptor: Descriptor, corpus: Corpus) -> list[str]:
    queries = [encode_query(query_pairs(v), brackets_raw=True)[:MAX_QUERY]
               for v in checklist_values(descriptor, corpus)]
    names = [f.name for f in descriptor.fields[:1]] or ["a"]
    raw = ["{f}[" + HUGE_DIGITS + "]=1", "{f}" + "[b]" * 5_000 + "=1", "{f}" + "[0]" * 5_000 + "=1",
           "{f}=%ff%fe", "{f}=%ed%a0%80"]
    return queries + [part.replace("{f}", name) for part in raw for name in names]


def checklist_protobuf(descriptor: Descriptor, corpus: Corpus) -> list[bytes]:
    """The JSON checklist values that protobuf can carry, plus invalid UTF-8 and deep nesting."""
    message_class = GetMessageClass(descriptor)
    bodies = []
    for value in checklist_values(descriptor, corpus):
        try:
            bodies.append(codec.from_json_value(value, message_class).SerializeToString())
        except Exception:  # out of range or not representable: a JSON-only poison
            continue
    number = descriptor.fields[0].number if descriptor.fields else 1
    deep = b""
    for _ in range(2_000):
        deep = length_delimited(number, deep)
    return [*dict.fromkeys(bodies), length_delimited(number, b"\xed\xa0\x80"), deep]
