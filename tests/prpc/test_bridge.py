"""The /prpc bridge's wire rules, exercised on the real daemon over TCP and a Unix socket."""

from __future__ import annotations

import concurrent.futures
import json
import socket
import stat
import subprocess

import httpx
import pytest
from google.protobuf.empty_pb2 import Empty

from tests.support.daemon_proc import DaemonProcess
from tests.support.kms_peer import expected_answer
from vmm.prpc.bridge import error_parts
from vmm.rpc import prpc_pb2
from vmm.rpc import vmm_rpc_pb2 as pb

PROTOBUF = {"Content-Type": "application/octet-stream"}


def curl_unix(daemon: DaemonProcess, path: str, *args: str) -> tuple[int, str]:
    out = subprocess.run(
        ["curl", "-sS", "--unix-socket", str(daemon.unix[0]), "-w", "\n%{http_code}",
         f"http://localhost{path}", *args],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout
    body, _, status = out.rpartition("\n")
    return int(status), body


def test_json_over_the_unix_socket_with_curl(daemon: DaemonProcess) -> None:
    """The README's Unix-socket curl call works: POST JSON, compact JSON back."""
    status, body = curl_unix(daemon, "/prpc/Version", "-d", "{}",
                             "-H", "Content-Type: application/json")
    assert status == 200
    assert json.loads(body)["version"]
    assert " " not in body  # compact


def test_unix_socket_is_private(daemon: DaemonProcess) -> None:
    """The API socket is created 0600."""
    mode = daemon.unix[0].stat().st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o600


def test_one_process_serves_tcp_and_unix(daemon: DaemonProcess) -> None:
    """The same daemon answers on both listeners."""
    with daemon.client() as tcp, daemon.unix_client() as unix:
        assert tcp.get("/prpc/Version").json() == unix.get("/prpc/Version").json()


@pytest.mark.parametrize("query", ["?json", "?json=", "?json=1", "?json=true"])
def test_json_query_flag_selects_json(daemon: DaemonProcess, query: str) -> None:
    """?json (empty, 1 or true) selects JSON even without a JSON content type."""
    with daemon.client() as client:
        response = client.post(f"/prpc/Version{query}", content=b"{}")
    assert response.headers["content-type"] == "application/json"
    assert "version" in response.json()


def test_get_is_json_and_reads_the_query(daemon: DaemonProcess) -> None:
    """GET answers JSON and maps query parameters onto the request message."""
    compose = '{"runner":"docker-compose"}'
    with daemon.client() as client:
        response = client.get("/prpc/GetComposeHash", params={"name": "n", "compose_file": compose})
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert len(response.json()["hash"]) == 64


def test_protobuf_request_gets_protobuf_answer(daemon: DaemonProcess) -> None:
    """A binary body without a JSON content type is protobuf, answered in protobuf."""
    with daemon.client() as client:
        response = client.post(
            "/prpc/GetAppEnvEncryptPubKey",
            content=pb.AppId(app_id=b"\x12\x34").SerializeToString(),
            headers=PROTOBUF,
        )
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/octet-stream"
    answer = pb.PublicKeyResponse.FromString(response.content)
    assert answer.public_key.hex() == expected_answer(b"\x12\x34")["public_key"]
    assert answer.timestamp == expected_answer(b"\x12\x34")["timestamp"]


def test_hex_bytes_round_trip_in_json(daemon: DaemonProcess) -> None:
    """Hex bytes go in (any case, 0x allowed) and come out lowercase hex."""
    with daemon.client() as client:
        response = client.post(
            "/prpc/GetAppEnvEncryptPubKey?json", json={"app_id": "0xABCDEF"}
        )
    assert response.status_code == 200
    assert response.json() == expected_answer(bytes.fromhex("abcdef"))


def test_empty_result_is_null_or_zero_bytes(daemon: DaemonProcess) -> None:
    """An Empty-typed answer is the JSON literal null, or a zero-byte protobuf body."""
    lease = {"mac": "02:ab:cd:ef:01:23", "ip": "192.168.122.100"}
    with daemon.client() as client:
        json_answer = client.post("/prpc/ReportDhcpLease", json=lease)
        proto_answer = client.post(
            "/prpc/ReportDhcpLease",
            content=pb.DhcpLeaseRequest(**lease).SerializeToString(),
            headers=PROTOBUF,
        )
    assert json_answer.status_code == 200
    assert json_answer.content == b"null"
    assert proto_answer.status_code == 200
    assert proto_answer.content == b""


def test_empty_request_accepts_any_body(daemon: DaemonProcess) -> None:
    """Methods taking Empty accept null, {} or an empty protobuf body."""
    with daemon.client() as client:
        for response in (
            client.post("/prpc/ListImages?json", content=b"null"),
            client.post("/prpc/ListImages?json", content=b'{"ignored": 1}'),
            client.post("/prpc/ListImages", content=Empty().SerializeToString(), headers=PROTOBUF),
        ):
            assert response.status_code == 200


@pytest.mark.parametrize("name", ["Teepod.Version", "Teepod.Teepod.Version"])
def test_teepod_prefix_is_stripped(daemon: DaemonProcess, name: str) -> None:
    """Legacy Teepod.-prefixed method names reach the same RPC."""
    with daemon.client() as client:
        response = client.post(f"/prpc/{name}?json")
    assert response.status_code == 200
    assert "version" in response.json()


@pytest.mark.parametrize("name", ["Nope", "Vmm.Version", "version"])
def test_unknown_method_is_a_4xx_naming_it(daemon: DaemonProcess, name: str) -> None:
    """An unknown (or differently spelled) method is a 400 that names it."""
    with daemon.client() as client:
        response = client.post(f"/prpc/{name}?json", json={})
        proto = client.post(f"/prpc/{name}", content=b"", headers=PROTOBUF)
    assert response.status_code == 400
    assert response.json()["code"] == "UNKNOWN_METHOD"
    assert name in response.json()["error"]
    assert response.json()["message"] == response.json()["error"]
    assert proto.status_code == 400
    assert name in prpc_pb2.PrpcError.FromString(proto.content).message


@pytest.mark.parametrize("path", ["/prpc/a/b", "/prpc/", "/prpc", "/nothing"])
def test_paths_that_match_no_route_are_404(daemon: DaemonProcess, path: str) -> None:
    """Extra or missing path segments are a 404 with a JSON error."""
    with daemon.client() as client:
        response = client.post(path, json={})
    assert response.status_code == 404
    assert "no such route" in response.json()["error"]


def test_other_http_methods_are_405(daemon: DaemonProcess) -> None:
    """Only GET and POST are served on /prpc/<Method>."""
    with daemon.client() as client:
        response = client.put("/prpc/Version", json={})
    assert response.status_code == 405


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"{", "malformed JSON"),
        (b"[]", "must be a JSON object"),
        (b'{"app_id": 5}', "invalid field `app_id`: expected a hex string"),
        (b'{"app_id": null}', "app_id"),
        (b'{"app_id": "nothex"}', "not a hex string"),
    ],
)
def test_bad_json_is_a_400_with_a_reason(daemon: DaemonProcess, body: bytes, fragment: str) -> None:
    """Malformed JSON, wrong types, null and bad hex each give 400 with a clear message."""
    with daemon.client() as client:
        response = client.post(
            "/prpc/GetAppEnvEncryptPubKey", content=body,
            headers={"Content-Type": "application/json"},
        )
    assert response.status_code == 400
    assert fragment in response.json()["error"]


def test_null_for_a_scalar_is_rejected(daemon: DaemonProcess) -> None:
    """null for a plain scalar is a decode error naming the field."""
    with daemon.client() as client:
        response = client.post("/prpc/Status?json", json={"brief": None})
    assert response.status_code == 400
    assert response.json()["error"] == "invalid field `brief`: null is not a valid bool"


def test_malformed_protobuf_is_a_400_prpc_error(daemon: DaemonProcess) -> None:
    """A corrupt protobuf body gets a 400 whose body is a PrpcError."""
    with daemon.client() as client:
        response = client.post(
            "/prpc/GetAppEnvEncryptPubKey", content=b"\x0a\xff", headers=PROTOBUF
        )
    assert response.status_code == 400
    assert "malformed protobuf" in prpc_pb2.PrpcError.FromString(response.content).message


def test_oversized_declared_body_is_refused_unread(daemon: DaemonProcess) -> None:
    """A Content-Length over 10 MiB is refused with 413 before the body is read."""
    with socket.create_connection(("127.0.0.1", int(daemon.base_url.rsplit(":", 1)[1]))) as sock:
        sock.settimeout(10)
        sock.sendall(
            b"POST /prpc/Version?json HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\nContent-Length: 20000000\r\n\r\n{"
        )
        reply = b""
        while b"payload too large" not in reply:
            chunk = sock.recv(65536)  # the socket timeout bounds the wait
            if not chunk:
                break
            reply += chunk
    text = reply.decode()
    assert text.startswith("HTTP/1.1 413")
    assert "payload too large" in text


def test_oversized_streamed_body_is_refused(daemon: DaemonProcess) -> None:
    """A chunked body that grows past the limit is cut off with 413."""

    def chunks() -> object:
        block = b" " * (1024 * 1024)
        for _ in range(11):
            yield block

    with daemon.client() as client:
        response = client.post(
            "/prpc/Version?json", content=chunks(),  # type: ignore[arg-type]
            headers={"Content-Type": "application/json"},
        )
    assert response.status_code == 413
    assert response.json()["code"] == "PAYLOAD_TOO_LARGE"


def test_request_id_is_echoed_or_made(daemon: DaemonProcess) -> None:
    """Every answer has X-Request-Id (the client's if sane) and X-App-Version."""
    with daemon.client() as client:
        echoed = client.post("/prpc/Version?json", headers={"X-Request-Id": "abc-123"})
        made = client.post("/prpc/Version?json")
        insane = client.post("/prpc/Version?json", headers={"X-Request-Id": "a b\tc"})
        error = client.post("/prpc/Nope?json", headers={"X-Request-Id": "e-1"})
    assert echoed.headers["x-request-id"] == "abc-123"
    assert len(made.headers["x-request-id"]) == 32
    assert insane.headers["x-request-id"] != "a b\tc"
    assert error.headers["x-request-id"] == "e-1"
    for response in (echoed, made, error):
        assert response.headers["x-app-version"]


def test_many_concurrent_calls_on_both_listeners(daemon: DaemonProcess) -> None:
    """Parallel clients on TCP and Unix all get correct answers."""
    def call(i: int) -> int:
        client = daemon.client() if i % 2 else daemon.unix_client()
        with client:
            return client.post("/prpc/Version?json").status_code

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        assert set(pool.map(call, range(64))) == {200}


def test_connection_survives_an_error(daemon: DaemonProcess) -> None:
    """A keep-alive connection keeps working after an error answer."""
    with httpx.Client(base_url=daemon.base_url, timeout=10) as client:
        assert client.post("/prpc/Nope?json").status_code == 400
        assert client.post("/prpc/Version?json").status_code == 200


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b'{"keyword": "\\ud800"}', "invalid field `keyword`: contains a lone surrogate"),
        (b'{"ids": ["ok", "x\\udc00"]}', "invalid field `ids[1]`: contains a lone surrogate"),
        (b"[" * 2000 + b"]" * 2000, "nested too deeply"),
        (b'{"keyword": ' + b'{"a": ' * 2000 + b"1" + b"}" * 2001, "nested too deeply"),
        (b'{"page": ' + b"9" * 5000 + b"}", "invalid field `page`: an integer of 5000 digits"),
        (b'{"keyword": -' + b"9" * 4301 + b"}", "invalid field `keyword`: expected a string"),
    ],
)
def test_json_bodies_that_break_the_decoder_are_400(
    daemon: DaemonProcess, body: bytes, fragment: str
) -> None:
    """Lone surrogates, nesting thousands deep and 5,000-digit integers are 400s, not 500s."""
    with daemon.client() as client:
        response = client.post("/prpc/Status?json", content=body,
                               headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    assert fragment in response.json()["error"]


@pytest.mark.parametrize(
    ("query", "fragment"),
    [
        ("ids" + "[0]" * 2000 + "=x", "invalid field `ids`: query key nests 2001 levels deep"),
        ("ids" + "[a]" * 2000 + "=x", "invalid field `ids`: query key nests 2001 levels deep"),
        ("ids[99999999]=x", "invalid field `ids`: list index 99999999 is over"),
        ("ids[" + "9" * 5000 + "]=x", "invalid field `ids`: list index of 5000 digits is over"),
        ("page=" + "9" * 5000, "invalid field `page`: an integer of 5000 digits"),
        ("ids[%C2%B2]=x", "invalid field `ids[0]`: expected a string"),
    ],
)
def test_get_queries_that_break_the_decoder_are_400(
    daemon: DaemonProcess, query: str, fragment: str
) -> None:
    """Query keys thousands deep, huge list indices and huge numbers are 400s naming the field."""
    with daemon.client() as client:
        response = client.get(f"/prpc/Status?{query}")
    assert response.status_code == 400, response.text
    assert fragment in response.json()["error"]


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"\x9b\x06" * 2000 + b"\x9c\x06" * 2000, "malformed protobuf body for Id"),
        (b"\x0a\x03\xed\xa0\x80", "bad UTF-8"),
    ],
)
def test_protobuf_bodies_that_break_the_decoder_are_400(
    daemon: DaemonProcess, body: bytes, fragment: str
) -> None:
    """Protobuf groups nested 2,000 deep and a CESU-encoded surrogate are 400 PrpcErrors."""
    with daemon.client() as client:
        response = client.post("/prpc/GetInfo", content=body, headers=PROTOBUF)
    assert response.status_code == 400
    assert fragment in prpc_pb2.PrpcError.FromString(response.content).message


@pytest.mark.parametrize("use_json", [True, False])
def test_an_error_message_with_a_lone_surrogate_still_encodes(use_json: bool) -> None:
    """An error text carrying a lone surrogate is escaped, so the error reply itself cannot fail."""
    status, _, body = error_parts("bad \ud800 value", "X", 400, use_json=use_json)
    assert status == 400
    message = (json.loads(body)["error"] if use_json
               else prpc_pb2.PrpcError.FromString(body).message)
    assert message == "bad \\ud800 value"
