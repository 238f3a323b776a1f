"""Fuzzed HTTP requests for the daemon's routes, and the checks every answer must pass.

``rpc_requests``/``rpc_checklist`` turn a method descriptor into requests in one encoding: a JSON
POST (every way a POST selects JSON), a protobuf POST, or a GET query string; ``logs_*`` do the
same for ``GET /logs``. The ``*_problems`` functions return what is wrong with an answer (an
empty list when nothing is).
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import DecodeError, Message
from google.protobuf.message_factory import GetMessageClass
from hypothesis import strategies as st

from tests.support.fuzz_checklist import checklist_json, checklist_protobuf, checklist_queries
from tests.support.fuzz_env import Reply, preview
from tests.support.fuzz_protobuf import protobuf_bodies
from tests.support.fuzz_strategies import (
    HUGE_DIGITS,
    Corpus,
    json_bodies,
    logs_queries,
    query_strings,
)
from vmm.rpc import prpc_pb2

ENCODINGS = ("json", "protobuf", "query")
Transport = tuple[str, str | None]  # (query suffix, content type)
JSON_TRANSPORTS: tuple[Transport, ...] = (  # every way a POST selects JSON
    ("", "application/json"),
    ("", "application/json; charset=utf-8"),
    ("", "text/json"),
    ("", "application/problem+json"),
    ("?json", None),
    ("?json=1", "text/plain"),
)
PROTOBUF_TRANSPORTS: tuple[Transport, ...] = (
    ("", "application/octet-stream"), ("", None), ("?json=0", None),
)


@dataclass(frozen=True)
class FuzzRequest:
    method: str
    raw_path: bytes
    body: bytes = b""
    content_type: str | None = None
    leave_stream: bool = False  # a followed log: only the status and headers are awaited

    def __repr__(self) -> str:
        head = f"{self.method} {preview(self.raw_path, 600)}"
        if self.content_type:
            head += f" [{self.content_type}]"
        return head + (f" body={preview(self.body, 600)}" if self.method == "POST" else "")

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        """How Hypothesis shows a failing example: the short form, not megabytes of body."""
        printer.text(repr(self))


def _get(path: str, query: str) -> FuzzRequest:
    return FuzzRequest("GET", f"{path}?{query}".encode() if query else path.encode())


def _post(path: str, transport: Transport, body: bytes) -> FuzzRequest:
    return FuzzRequest("POST", f"{path}{transport[0]}".encode(), body, content_type=transport[1])


def rpc_requests(
    mount: str, method: MethodDescriptor, encoding: str, corpus: Corpus
) -> st.SearchStrategy[FuzzRequest]:
    path = f"{mount}/{method.name}"
    descriptor = method.input_type
    if encoding == "query":
        return query_strings(descriptor, corpus).map(lambda query: _get(path, query))
    if encoding == "json":
        transports, bodies = JSON_TRANSPORTS, json_bodies(descriptor, corpus)
    else:
        transports, bodies = PROTOBUF_TRANSPORTS, protobuf_bodies(descriptor, corpus)
    return st.builds(lambda t, body: _post(path, t, body), st.sampled_from(transports), bodies)


def rpc_checklist(
    mount: str, method: MethodDescriptor, encoding: str, corpus: Corpus
) -> list[FuzzRequest]:
    path = f"{mount}/{method.name}"
    descriptor = method.input_type
    if encoding == "query":
        return [_get(path, query) for query in checklist_queries(descriptor, corpus)]
    if encoding == "json":
        return [_post(path, JSON_TRANSPORTS[0], b) for b in checklist_json(descriptor, corpus)]
    return [_post(path, PROTOBUF_TRANSPORTS[0], b) for b in checklist_protobuf(descriptor, corpus)]


def _logs_request(query: str) -> FuzzRequest:
    # A followed log never ends: with any `follow` parameter only the headers are awaited.
    follows = any(key == "follow" for key, _ in parse_qsl(query, keep_blank_values=True))
    return FuzzRequest("GET", f"/logs?{query}".encode(), leave_stream=follows)


def logs_requests(corpus: Corpus) -> st.SearchStrategy[FuzzRequest]:
    return logs_queries(corpus).map(_logs_request)


def logs_checklist(corpus: Corpus) -> list[FuzzRequest]:
    vm = corpus.known[0] if corpus.known else "x"
    queries = [
        f"id={vm}", f"id={vm}&lines=0&ansi=1", f"id={vm}&lines=3&ch=stdout", f"id={vm}&follow",
        f"id={vm}&follow=1&lines=1", f"id={vm}&lines={HUGE_DIGITS}", f"id={vm}&lines=-1",
        f"id={vm}&ch=../manifest", f"id={vm}&follow=maybe", "id=..", "id=.", "id=%00", "id=a%0Ab",
        "id=%ed%a0%80", "id=%ff", "lines=1", "", f"id={vm}&id=..",
    ]
    return [_logs_request(query) for query in queries]


def error_body_problems(reply: Reply, use_json: bool) -> list[str]:
    if use_json:
        try:
            doc = json.loads(reply.body)
        except ValueError:
            return [f"error body is not JSON: {preview(reply.body)}"]
        if not isinstance(doc, dict) or not doc.get("error") or not isinstance(doc.get("code"), str):
            return [f"error body lacks error/code: {preview(reply.body)}"]
        return []
    try:
        message = prpc_pb2.PrpcError.FromString(reply.body).message
    except DecodeError:
        return [f"error body is not a PrpcError: {preview(reply.body)}"]
    return [] if message else ["PrpcError with an empty message"]


def rpc_reply_problems(
    method: MethodDescriptor, reply: Reply, *, use_json: bool, allowed_5xx: Collection[int]
) -> list[str]:
    problems = []
    if reply.status >= 500 and reply.status not in allowed_5xx:
        problems.append(f"HTTP {reply.status}")
    if "x-request-id" not in reply.headers:
        # Refused by the HTTP server before the app saw it (e.g. an over-long request line).
        return problems if 400 <= reply.status < 500 else [*problems, "server-level non-4xx"]
    if reply.status != 200:
        return problems + error_body_problems(reply, use_json)
    output: type[Message] = GetMessageClass(method.output_type)
    try:
        if use_json:
            json.loads(reply.body)
        else:
            output.FromString(reply.body)
    except (ValueError, DecodeError) as exc:
        problems.append(f"200 with a body that is not a {output.__name__}: {exc}")
    return problems


def logs_reply_problems(reply: Reply) -> list[str]:
    if reply.status >= 500:
        return [f"HTTP {reply.status}"]
    if reply.status != 200:
        return error_body_problems(reply, use_json=True)
    if not reply.headers.get("content-type", "").startswith("text/plain"):
        return [f"200 with content type {reply.headers.get('content-type')!r}"]
    return []
