"""Protobuf request bodies built at the wire level from a message descriptor.

The bytes are assembled by hand (tags, varints, lengths), not through the message class, so
they can carry what a real client never would: wrong wire types, groups, lengths past the end,
eleven-byte varints, unknown field numbers, invalid UTF-8 in string fields, nesting thousands
deep. Seeds are encoded with the daemon's own codec and extended with fuzzed fields, which
protobuf merges in (the last value of a scalar wins).
"""

from __future__ import annotations

from collections.abc import Sequence

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message_factory import GetMessageClass
from hypothesis import strategies as st

from tests.support.fuzz_strategies import MAX_DEPTH, Corpus, message_type_of, strings
from vmm.prpc import codec

_VARINT, _I64, _LEN, _SGROUP, _EGROUP, _I32 = 0, 1, 2, 3, 4, 5
_VARINT_TYPES = frozenset({
    FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT32,
    FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_BOOL, FieldDescriptor.TYPE_ENUM,
})
_I32_TYPES = frozenset({FieldDescriptor.TYPE_FIXED32, FieldDescriptor.TYPE_SFIXED32,
                        FieldDescriptor.TYPE_FLOAT})
_I64_TYPES = frozenset({FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED64,
                        FieldDescriptor.TYPE_DOUBLE})


def varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative numbers are sent as their 64-bit two's complement
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def tag(number: int, wire_type: int) -> bytes:
    return varint((number << 3) | wire_type)


def length_delimited(number: int, payload: bytes) -> bytes:
    return tag(number, _LEN) + varint(len(payload)) + payload


_VARINTS = st.one_of(
    st.sampled_from([0, 1, 2, 64, 1024, 65535, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**63 - 1,
                     2**64 - 1, -1, -(2**31)]),
    st.integers(-(2**63), 2**64 - 1),
)
_INVALID_UTF8 = (b"\xff", b"\xc3", b"\xed\xa0\x80", b"a\x80b", b"\xf4\x90\x80\x80", b"\xc0\xaf")


def _pb_text(known: Sequence[str]) -> st.SearchStrategy[bytes]:
    return st.one_of(
        strings(known).map(lambda s: s.encode("utf-8", "surrogatepass")),
        st.sampled_from(_INVALID_UTF8),
    )


def _pb_valid_field(
    field: FieldDescriptor, known: Sequence[str], depth: int
) -> st.SearchStrategy[bytes]:
    number = field.number
    if field.type in _VARINT_TYPES:
        return _VARINTS.map(lambda v: tag(number, _VARINT) + varint(v))
    if field.type in _I32_TYPES:
        return st.binary(min_size=4, max_size=4).map(lambda b: tag(number, _I32) + b)
    if field.type in _I64_TYPES:
        return st.binary(min_size=8, max_size=8).map(lambda b: tag(number, _I64) + b)
    if field.type == FieldDescriptor.TYPE_STRING:
        return _pb_text(known).map(lambda b: length_delimited(number, b))
    if field.type == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=64).map(lambda b: length_delimited(number, b))
    if depth >= MAX_DEPTH:
        return st.just(length_delimited(number, b""))
    return protobuf_message(message_type_of(field), known, depth + 1).map(
        lambda b: length_delimited(number, b)
    )


def _pb_packed(field: FieldDescriptor) -> st.SearchStrategy[bytes]:
    """A packed repeated numeric field (how proto3 sends repeated scalars)."""
    if field.type in _VARINT_TYPES:
        items = st.lists(_VARINTS, max_size=5).map(lambda vs: b"".join(varint(v) for v in vs))
    else:
        size = 4 if field.type in _I32_TYPES else 8
        items = st.integers(0, 5).flatmap(lambda n: st.binary(min_size=n * size, max_size=n * size))
    return items.map(lambda payload: length_delimited(field.number, payload))


def _pb_broken_field(number: int) -> st.SearchStrategy[bytes]:
    """A field entry whose framing is wrong: another wire type, a group, a bad length."""
    return st.one_of(
        st.sampled_from([_VARINT, _I64, _LEN, _I32]).map(lambda w: tag(number, w)).flatmap(
            lambda t: st.binary(max_size=9).map(lambda b: t + b)
        ),
        st.just(tag(number, _SGROUP) + tag(number, _EGROUP)),
        st.just(tag(number, _EGROUP)),
        st.just(tag(number, 6)),
        st.just(tag(number, _LEN) + varint(2**31)),
        st.just(tag(number, _VARINT) + b"\xff" * 11),
    )


@st.composite
def protobuf_message(
    draw: st.DrawFn, descriptor: Descriptor, known: Sequence[str], depth: int = 0
) -> bytes:
    """Wire-format bytes for ``descriptor``: its fields in any order, repeats and unknowns."""
    entries: list[bytes] = []
    fields = list(descriptor.fields)
    if fields:
        for field in draw(st.lists(st.sampled_from(fields), max_size=6)):
            numeric = field.type not in (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES,
                                         FieldDescriptor.TYPE_MESSAGE)
            choice = draw(st.integers(0, 9))
            if choice == 0:
                entries.append(draw(_pb_broken_field(field.number)))
            elif choice == 1 and field.is_repeated and numeric:
                entries.append(draw(_pb_packed(field)))
            else:
                entries.append(draw(_pb_valid_field(field, known, depth)))
    if draw(st.integers(0, 4)) == 0:
        number = draw(st.one_of(st.integers(1, 2**29 - 1), st.sampled_from([0, 2**29 - 1, 19000])))
        entries.append(draw(st.one_of(
            st.binary(max_size=16).map(lambda b: length_delimited(number, b)),
            _VARINTS.map(lambda v: tag(number, _VARINT) + varint(v)),
            _pb_broken_field(number),
        )))
    return b"".join(entries)


def encoded_seeds(descriptor: Descriptor, corpus: Corpus) -> list[bytes]:
    message_class = GetMessageClass(descriptor)
    return [codec.from_json_value(seed, message_class).SerializeToString()
            for seed in corpus.seeds_for(descriptor)]


@st.composite
def protobuf_bodies(draw: st.DrawFn, descriptor: Descriptor, corpus: Corpus) -> bytes:
    """A protobuf request body: a seed with fields appended (last wins), generated, cut, noise."""
    seeds = encoded_seeds(descriptor, corpus)
    kinds = ["message", "message", "message", "truncated", "noise", "nested"]
    kind = draw(st.sampled_from(["seeded", "seeded", *kinds] if seeds else kinds))
    if kind == "seeded":
        seed = draw(st.sampled_from(seeds))
        return seed + draw(protobuf_message(descriptor, corpus.known)) if draw(st.booleans()) else seed
    body = draw(protobuf_message(descriptor, corpus.known))
    if kind == "truncated" and body:
        return body[: draw(st.integers(0, len(body) - 1))]
    if kind == "noise":
        return draw(st.binary(max_size=200))
    if kind == "nested":
        # A length-delimited field nested far past any sane depth, numbered like a real field.
        number = descriptor.fields[0].number if descriptor.fields else 1
        inner = b""
        for _ in range(draw(st.sampled_from([100, 2_000]))):
            inner = length_delimited(number, inner)
        return inner
    return body
