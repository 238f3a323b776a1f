"""The pRPC codec against dstack's JSON rules."""

from __future__ import annotations

import json

import pytest
from google.protobuf.empty_pb2 import Empty

from vmm.core.exceptions import DecodeError, InvalidField
from vmm.prpc import codec
from vmm.rpc import guest_api_pb2 as gpb
from vmm.rpc import vmm_rpc_pb2 as pb


def test_field_names_stay_snake_case_and_bytes_are_lowercase_hex() -> None:
    """Encoding keeps proto field names and writes bytes as lowercase hex without 0x."""
    message = pb.VmConfiguration(name="a", encrypted_env=b"\x00\xffAB", no_tee=True)
    value = codec.to_json_value(message)
    assert value["encrypted_env"] == "00ff4142"
    assert value["no_tee"] is True
    assert "encryptedEnv" not in value


def test_absent_optional_and_message_fields_are_null() -> None:
    """Unset proto3 optional scalars and singular messages encode as null, set ones as values."""
    value = codec.to_json_value(pb.VmConfiguration(name="x"))
    assert value["app_id"] is None
    assert value["gpus"] is None
    assert value["networking"] is None
    assert value["ports"] == []
    assert value["vcpu"] == 0
    value = codec.to_json_value(pb.VmConfiguration(app_id="", gpus=pb.GpuConfig()))
    assert value["app_id"] == ""
    assert value["gpus"] == {"gpus": [], "attach_mode": ""}


def test_uint64_is_a_json_number() -> None:
    """64-bit integers are plain JSON numbers, not strings as in protobuf's canonical JSON."""
    data = codec.to_json_bytes(pb.PublicKeyResponse(timestamp=2**63 + 5))
    assert json.loads(data)["timestamp"] == 2**63 + 5
    assert b'"timestamp":9223372036854775813' in data


def test_empty_is_null() -> None:
    """An Empty result is the literal JSON null."""
    assert codec.to_json_bytes(Empty()) == b"null"


def test_round_trip_of_a_full_message() -> None:
    """Every field survives JSON encode then decode."""
    original = pb.VmConfiguration(
        name="my-app",
        image="img",
        compose_file="{}",
        vcpu=2,
        memory=4096,
        disk_size=40,
        ports=[pb.PortMapping(protocol="tcp", host_port=8080, vm_port=80, host_address="::1")],
        encrypted_env=bytes(range(256)),
        app_id="abc",
        gpus=pb.GpuConfig(gpus=[pb.GpuSpec(slot="18:00.0")], attach_mode="listed"),
        kms_urls=["http://k"],
        stopped=True,
        networking=pb.NetworkingConfig(mode="user"),
    )
    decoded = codec.from_json_bytes(codec.to_json_bytes(original), pb.VmConfiguration)
    assert decoded == original


def test_hex_input_accepts_0x_prefixes_and_uppercase() -> None:
    """Bytes fields accept a (even repeated) 0x prefix and uppercase digits."""
    for text in ("abcdef", "0xabcdef", "0x0xABCDEF", "0XabCDef"):
        message = codec.from_json_value({"app_id": text}, pb.AppId)
        assert isinstance(message, pb.AppId)
        assert message.app_id == b"\xab\xcd\xef"


@pytest.mark.parametrize(
    ("payload", "field", "reason"),
    [
        ({"app_id": "xyz1"}, "app_id", "not a hex string"),
        ({"app_id": "abc"}, "app_id", "odd number"),
        ({"app_id": 12}, "app_id", "expected a hex string"),
    ],
)
def test_bad_hex_names_the_field(payload: dict[str, object], field: str, reason: str) -> None:
    """A non-hex bytes field is rejected with the field's name and the reason."""
    with pytest.raises(InvalidField) as info:
        codec.from_json_value(payload, pb.AppId)
    assert info.value.field == field
    assert reason in info.value.message


def test_missing_keys_default_and_unknown_keys_are_ignored() -> None:
    """Missing fields take defaults; unknown and camelCase keys are ignored like serde."""
    message = codec.from_json_value({"name": "n", "diskSize": 9, "extra": [1]}, pb.VmConfiguration)
    assert isinstance(message, pb.VmConfiguration)
    assert message.name == "n"
    assert message.disk_size == 0
    assert not message.HasField("app_id")


@pytest.mark.parametrize(
    ("payload", "field", "reason"),
    [
        ({"vcpu": None}, "vcpu", "null is not a valid uint32"),
        ({"name": None}, "name", "null is not a valid string"),
        ({"vcpu": "2"}, "vcpu", "expected an integer"),
        ({"vcpu": 2.5}, "vcpu", "expected an integer"),
        ({"vcpu": True}, "vcpu", "expected an integer"),
        ({"vcpu": -1}, "vcpu", "out of range"),
        ({"vcpu": 2**32}, "vcpu", "out of range"),
        ({"stopped": "yes"}, "stopped", "expected true or false"),
        ({"stopped": 1}, "stopped", "expected true or false"),
        ({"name": 5}, "name", "expected a string"),
        ({"ports": {}}, "ports", "expected an array"),
        ({"ports": None}, "ports", "expected an array"),
        ({"ports": [{"host_port": "80"}]}, "ports[0].host_port", "expected an integer"),
        ({"ports": [None]}, "ports[0]", "expected an object"),
        ({"gpus": []}, "gpus", "expected a JSON object"),
        ({"kms_urls": ["a", 3]}, "kms_urls[1]", "expected a string"),
    ],
)
def test_wrong_types_name_the_field(payload: dict[str, object], field: str, reason: str) -> None:
    """Every wrongly typed value is a 400-class error naming the exact field path."""
    with pytest.raises(InvalidField) as info:
        codec.from_json_value(payload, pb.VmConfiguration)
    assert info.value.field == field
    assert reason in info.value.message
    assert info.value.status_code == 400


def test_null_for_optional_and_message_fields_means_absent() -> None:
    """JSON null for an optional scalar or a message field leaves it unset."""
    message = codec.from_json_value({"app_id": None, "gpus": None}, pb.VmConfiguration)
    assert isinstance(message, pb.VmConfiguration)
    assert not message.HasField("app_id")
    assert not message.HasField("gpus")


@pytest.mark.parametrize("body", [b"", b"  \n", b"null"])
def test_empty_body_is_the_default_message(body: bytes) -> None:
    """An empty JSON body, or null, decodes to the default message."""
    assert codec.from_json_bytes(body, pb.StatusRequest) == pb.StatusRequest()


@pytest.mark.parametrize("body", [b"{", b"[1,2]", b'"text"', b"\xff\xfe"])
def test_malformed_or_non_object_bodies_are_decode_errors(body: bytes) -> None:
    """A body that is not JSON, or not a JSON object, is rejected with a decode error."""
    with pytest.raises(DecodeError):
        codec.from_json_bytes(body, pb.StatusRequest)


def test_query_strings_map_to_messages_like_serde_qs() -> None:
    """GET query strings fill scalars, indexed and bracketed lists, and nested messages."""
    message = codec.from_query_string(
        "keyword=my%20app&brief=true&page=2&ids[0]=a&ids[1]=b&json&token=t", pb.StatusRequest
    )
    assert message == pb.StatusRequest(keyword="my app", brief=True, page=2, ids=["a", "b"])
    nested = codec.from_query_string(
        "name=x&ports[0][host_port]=80&ports[0][protocol]=tcp&gpus[attach_mode]=all"
        "&gpus[gpus][0][slot]=18:00.0&kms_urls[]=u1&kms_urls[]=u2",
        pb.VmConfiguration,
    )
    assert isinstance(nested, pb.VmConfiguration)
    assert nested.ports[0].host_port == 80
    assert nested.gpus.attach_mode == "all"
    assert nested.gpus.gpus[0].slot == "18:00.0"
    assert list(nested.kms_urls) == ["u1", "u2"]


def test_query_string_values_are_type_checked() -> None:
    """A query value that does not fit its field names the field."""
    with pytest.raises(InvalidField) as info:
        codec.from_query_string("page=two", pb.StatusRequest)
    assert info.value.field == "page"
    with pytest.raises(InvalidField) as info:
        codec.from_query_string("brief=maybe", pb.StatusRequest)
    assert info.value.field == "brief"


def test_protobuf_binary_round_trip_and_unknown_fields() -> None:
    """Binary bodies decode with prost's rules: unknown fields skipped, empty is default."""
    info = gpb.GuestInfo(version="1", app_id=b"\x01")
    assert codec.from_protobuf_bytes(info.SerializeToString(), gpb.GuestInfo) == info
    assert codec.from_protobuf_bytes(b"", pb.Id) == pb.Id()
    # Field 99, varint 1: unknown to Id, skipped.
    assert codec.from_protobuf_bytes(b"\x98\x06\x01", pb.Id) == pb.Id()
    with pytest.raises(DecodeError):
        codec.from_protobuf_bytes(b"\x0a\xff", pb.Id)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b'{"name": "\\ud800"}', "name"),
        (b'{"name": "ok\\udfff tail"}', "name"),
        (b'{"kms_urls": ["a", "\\ud800"]}', "kms_urls[1]"),
        (b'{"ports": [{"protocol": "\\udc00"}]}', "ports[0].protocol"),
    ],
)
def test_lone_surrogates_are_refused_naming_the_field(body: bytes, field: str) -> None:
    """A JSON string escape that is half a surrogate pair is not text: 400 naming the field."""
    with pytest.raises(InvalidField) as info:
        codec.from_json_bytes(body, pb.VmConfiguration)
    assert info.value.field == field
    assert "lone surrogate" in info.value.reason


def test_a_surrogate_pair_is_one_character() -> None:
    """A proper pair (an emoji) still decodes."""
    message = codec.from_json_bytes(b'{"name": "\\ud83d\\ude00"}', pb.VmConfiguration)
    assert isinstance(message, pb.VmConfiguration)
    assert message.name == "\N{GRINNING FACE}"


@pytest.mark.parametrize(
    "body", [b"[" * 2000 + b"]" * 2000, b'{"name": ' + b'{"a": ' * 100_000 + b"1" + b"}" * 100_001]
)
def test_json_nested_too_deep_is_a_decode_error(body: bytes) -> None:
    """JSON nested thousands deep is a DecodeError saying so, not a RecursionError."""
    with pytest.raises(DecodeError, match="nested too deeply"):
        codec.from_json_bytes(body, pb.VmConfiguration)


@pytest.mark.parametrize(
    ("body", "field", "reason"),
    [
        (b'{"vcpu": ' + b"9" * 5000 + b"}", "vcpu", "5000 digits is out of range for uint32"),
        (b'{"vcpu": -' + b"9" * 5000 + b"}", "vcpu", "5000 digits is out of range for uint32"),
        (b'{"ports": [{"host_port": ' + b"1" * 4301 + b"}]}", "ports[0].host_port",
         "4301 digits is out of range"),
        (b'{"name": ' + b"7" * 9999 + b"}", "name", "expected a string, got a number of 9999 digits"),
        (b'{"kms_urls": [' + b"7" * 5000 + b"]}", "kms_urls[0]", "expected a string"),
    ],
)
def test_integers_over_pythons_digit_limit_name_the_field(
    body: bytes, field: str, reason: str
) -> None:
    """An integer of thousands of digits is a 400 naming its field, never Python's ValueError."""
    with pytest.raises(InvalidField) as info:
        codec.from_json_bytes(body, pb.VmConfiguration)
    assert info.value.field == field
    assert reason in info.value.reason
    assert len(info.value.message) < 300


def test_a_huge_integer_under_an_unknown_key_is_ignored() -> None:
    """Unknown keys are ignored whatever they hold, a 5,000-digit number included."""
    body = b'{"unknown": ' + b"9" * 5000 + b', "name": "x"}'
    assert codec.from_json_bytes(body, pb.VmConfiguration) == pb.VmConfiguration(name="x")


@pytest.mark.parametrize(
    ("query", "field", "reason"),
    [
        ("ids" + "[0]" * 3000 + "=x", "ids", "nests 3001 levels deep"),
        ("ids" + "[a]" * 3000 + "=x", "ids", "nests 3001 levels deep"),
        ("ids[99999999]=x", "ids", "list index 99999999 is over"),
        ("ids[" + "9" * 5000 + "]=x", "ids", "list index of 5000 digits is over"),
        ("page=" + "9" * 5000, "page", "5000 digits is out of range for uint32"),
        ("page=-" + "9" * 5000, "page", "5000 digits is out of range for uint32"),
        ("page=%C2%B2", "page", "expected an integer"),
    ],
)
def test_query_nesting_indices_and_digits_are_bounded(query: str, field: str, reason: str) -> None:
    """Query keys thousands deep, huge list indices and huge numbers are 400s naming the field."""
    with pytest.raises(InvalidField) as info:
        codec.from_query_string(query, pb.StatusRequest)
    assert info.value.field == field
    assert reason in info.value.reason
    assert len(info.value.message) < 300


def test_unicode_digits_are_not_list_indices() -> None:
    """Only ASCII digits index a list; '²' is a key like any other (and does not crash int())."""
    with pytest.raises(InvalidField) as info:
        codec.from_query_string("ids[%C2%B2]=x", pb.StatusRequest)
    assert info.value.field == "ids[0]"


def test_deep_unknown_protobuf_groups_are_a_decode_error() -> None:
    """Protobuf nested past the parser's depth limit is a DecodeError, not a crash."""
    body = b"\x9b\x06" * 2000 + b"\x9c\x06" * 2000  # field 99, start/end group
    with pytest.raises(DecodeError, match="malformed protobuf"):
        codec.from_protobuf_bytes(body, pb.Id)
    with pytest.raises(DecodeError, match="bad UTF-8"):
        codec.from_protobuf_bytes(b"\x0a\x03\xed\xa0\x80", pb.Id)  # a surrogate, CESU-encoded


def test_json_sent_as_protobuf_says_how_to_send_json() -> None:
    """A JSON body without ?json or a JSON content type fails with a hint naming both."""
    for body in (b"{}", b' {"id": "x"}', b"[1]"):
        with pytest.raises(DecodeError, match=r"add \?json to the URL or send Content-Type"):
            codec.from_protobuf_bytes(body, Empty if body == b"{}" else pb.Id)
    with pytest.raises(DecodeError) as raised:
        codec.from_protobuf_bytes(b"\x0a\xff", pb.Id)
    assert "?json" not in raised.value.message  # binary garbage gets no JSON hint


def test_plain_values_decode_to_what_they_say() -> None:
    """Strings, in-range integers and bools (decoded without the general path) land as given."""
    value = {
        "os_name": "Debian GNU/Linux", "os_version": "", "num_cpus": 2,
        "total_memory": 2**64 - 1, "free_memory": 0, "uptime": 17, "loadavg_one": 2**32 - 1,
        "disks": [{"name": "vda", "mount_point": "/", "total_size": 2**40, "free_size": 1}],
    }
    message = codec.from_json_value(value, gpb.SystemInfo)
    assert isinstance(message, gpb.SystemInfo)
    encoded = json.loads(codec.to_json_bytes(message))
    assert encoded | value == encoded
    assert message.total_memory == 2**64 - 1 and message.num_cpus == 2
    flags = codec.from_json_value({"stopped": True, "no_tee": False, "name": "é"}, pb.VmConfiguration)
    assert isinstance(flags, pb.VmConfiguration)
    assert (flags.stopped, flags.no_tee, flags.name) == (True, False, "é")
