"""The pRPC bridge: ``GET|POST <mount>/<Method>`` dispatched to one servicer object.

The route table comes from the service descriptor, never from a hand-written list: every method
of the service is served, and the servicer must implement each one (checked when the bridge is
built). A servicer method has the signature ``async def Method(self, request, ctx) -> response``.

Encoding follows dstack's pRPC rules: JSON when the request is a GET, has ``?json`` (empty,
``true`` or ``1``), or has a JSON content type; otherwise protobuf binary. The answer uses the
request's encoding, and so do errors: ``{"error", "message", "code"}`` or ``prpc.PrpcError``.

``observer``, when set, hears of every call once it is answered: (method, code, seconds), the
method ``(unknown)`` for a name the service lacks and the code ``OK`` for success. It is how the
metrics count RPCs without this module knowing of them.

With a ``read_gate`` (``fairness.ReadGate``), the methods it names as reads take turns on the
event loop under load, so mutating calls are never starved behind them. A handler may return a
``codec.Encoded`` reply, sent as is in the caller's encoding.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from vmm.core.exceptions import (
    OUT_OF_SPACE,
    BadRequest,
    PayloadTooLarge,
    StorageError,
    UnknownMethod,
    VmmError,
)
from vmm.prpc import codec
from vmm.prpc.body_budget import BodyBudget, BodyClaim
from vmm.prpc.fairness import ReadGate
from vmm.rpc import prpc_pb2

log = logging.getLogger(__name__)

JSON_TYPE = "application/json"
PROTOBUF_TYPE = "application/octet-stream"
LEGACY_PREFIX = "Teepod."
UNKNOWN_METHOD = "(unknown)"

# (method, code, seconds) of one answered call.
CallObserver = Callable[[str, str, float], None]


@dataclass(frozen=True)
class CallContext:
    """What a servicer may want to know about the caller."""

    request_id: str
    client: str
    headers: Mapping[str, str]
    # Set when the caller is a VM (host API): the VM the channel or vsock CID belongs to.
    vm_id: str = ""


class Handler(Protocol):
    def __call__(self, request: Message, ctx: CallContext) -> Awaitable[Message]: ...


@dataclass(frozen=True)
class _Method:
    name: str
    input_class: type[Message]
    output_class: type[Message]
    handler: Callable[[Message, CallContext], Awaitable[Message]]


class PrpcBridge:
    """Serve one protobuf service at a mount point (``/prpc``, ``/guest``, ``/api``)."""

    def __init__(
        self,
        service: ServiceDescriptor,
        servicer: object,
        *,
        max_body: int,
        strip_prefixes: tuple[str, ...] = (),
        body_budget: BodyBudget | None = None,
        read_gate: ReadGate | None = None,
    ) -> None:
        self.service = service
        self.read_gate = read_gate
        self.max_body = max_body
        self.body_budget = body_budget
        self.strip_prefixes = strip_prefixes
        self.methods = {m.name: self._bind(m, servicer) for m in service.methods}
        self.observer: CallObserver | None = None

    @staticmethod
    def _bind(method: MethodDescriptor, servicer: object) -> _Method:
        handler = getattr(servicer, method.name, None)
        if not callable(handler):
            owner = type(servicer).__name__
            service = method.containing_service.name
            raise TypeError(f"{owner} does not implement {service}.{method.name}")
        return _Method(
            name=method.name,
            input_class=GetMessageClass(method.input_type),
            output_class=GetMessageClass(method.output_type),
            handler=handler,
        )

    def route(self, mount: str) -> Route:
        return Route(f"{mount}/{{method}}", self.endpoint, methods=["GET", "POST"])

    def resolve(self, name: str) -> _Method:
        for prefix in self.strip_prefixes:
            while name.startswith(prefix):
                name = name[len(prefix) :]
        method = self.methods.get(name)
        if method is None:
            raise UnknownMethod(name)
        return method

    async def endpoint(self, request: Request) -> Response:
        use_json = wants_json(request)
        query: str | None = None
        body = b""
        # The claim lasts until the handler is done: the body (and what is decoded from it) is
        # held in memory all that time.
        async with self._claim() as claim:
            if request.method == "GET":
                query = request.url.query
            else:
                try:
                    body = await read_body(request, self.max_body, claim)
                except VmmError as exc:
                    return error_response(exc, use_json=use_json)
            status, media_type, payload = await self.dispatch(
                request.path_params["method"], body, use_json=use_json,
                ctx=call_context(request), query=query,
            )
        return Response(payload, status_code=status, media_type=media_type)

    def _claim(self) -> contextlib.AbstractAsyncContextManager[BodyClaim | None]:
        if self.body_budget is None:
            return contextlib.nullcontext()
        return self.body_budget.claim()

    async def dispatch(
        self, name: str, body: bytes, *, use_json: bool, ctx: CallContext, query: str | None = None
    ) -> tuple[int, str, bytes]:
        """Decode, call and encode one RPC: (status, media type, body). Shared by every transport."""
        started, code = time.perf_counter(), "INTERNAL"  # stays so if the handler has a bug
        try:
            code, answer = await self._dispatch(name, body, use_json=use_json, ctx=ctx, query=query)
            return answer
        except asyncio.CancelledError:
            code = "CANCELLED"  # the caller left, or the daemon is stopping
            raise
        finally:
            if self.observer is not None:
                try:
                    label = self.resolve(name).name
                except UnknownMethod:
                    label = UNKNOWN_METHOD
                self.observer(label, code, time.perf_counter() - started)

    async def _dispatch(
        self, name: str, body: bytes, *, use_json: bool, ctx: CallContext, query: str | None
    ) -> tuple[str, tuple[int, str, bytes]]:
        """(the answer's code, the answer)."""
        try:
            method = self.resolve(name)
            if query is not None:
                message = codec.from_query_string(query, method.input_class)
            elif use_json:
                message = codec.from_json_bytes(body, method.input_class)
            else:
                message = codec.from_protobuf_bytes(body, method.input_class)
            if self.read_gate is None:
                result = await method.handler(message, ctx)
            else:  # reads queue under load; other calls never do
                result = await self.read_gate.run(method.name, method.handler(message, ctx))
            if isinstance(result, codec.Encoded) and result.message_class is method.output_class:
                if use_json:
                    return "OK", (200, JSON_TYPE, result.json())
                return "OK", (200, PROTOBUF_TYPE, result.protobuf())
            if not isinstance(result, method.output_class):
                raise TypeError(
                    f"{method.name} returned {type(result).__name__}, "
                    f"expected {method.output_class.__name__}"
                )
        except VmmError as exc:
            return exc.code, error_parts(exc.message, exc.code, exc.status_code, use_json=use_json)
        except OSError as exc:
            if exc.errno not in OUT_OF_SPACE:
                raise
            # Any write of state can meet a full disk (vm-state.json at StopVm, serial.log at
            # StartVm); each is the same condition for the caller, whichever call hit it.
            error = StorageError.of(exc, _short_path(exc.filename))
            log.warning("%s: %s", name, error.message)
            return error.code, error_parts(error.message, error.code, error.status_code,
                                           use_json=use_json)
        if use_json:
            return "OK", (200, JSON_TYPE, codec.to_json_bytes(result))
        return "OK", (200, PROTOBUF_TYPE, result.SerializeToString())


def _short_path(filename: object) -> str:
    """The file's last two components (a VM id and a file name): never a whole host path."""
    if not isinstance(filename, str | bytes):
        return "state"
    return "/".join(Path(os.fsdecode(filename)).parts[-2:])


def wants_json(request: Request) -> bool:
    if request.method == "GET":
        return True
    raw_query: bytes = request.scope.get("query_string", b"")
    # Parsing the query costs more than the rest of a small call: only when it may say json.
    if (b"json" in raw_query or b"%" in raw_query) and \
            request.query_params.get("json", None) in ("", "true", "1"):
        return True
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    return content_type in (JSON_TYPE, "text/json") or content_type.endswith("+json")


async def read_body(request: Request, limit: int, claim: BodyClaim | None = None) -> bytes:
    """Read the request body, refusing (and reading no further) past ``limit`` bytes.

    With a ``claim``, the bytes are counted against the process-wide body budget first.
    """
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit():
        if int(declared) > limit:
            raise PayloadTooLarge(f"payload too large: {declared} bytes (limit {limit})")
        if claim is not None:
            await claim.cover(int(declared))
    chunks: list[bytes] = []
    size = 0
    # ASGI messages read directly: Request.stream() is an async generator, which costs more
    # than the rest of reading a small body.
    receive = request.receive
    while True:
        message = await receive()
        if message["type"] != "http.request":
            # The server closed a body that took too long, or the client left: nobody will
            # read an answer, and this is no bug to log with a traceback.
            raise BadRequest("request body incomplete: the client left or was too slow")
        chunk: bytes = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"payload too large: more than {limit} bytes")
            if claim is not None:
                await claim.cover(size)
            chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def call_context(request: Request) -> CallContext:
    client = request.client
    return CallContext(
        # The scope's state dict, as Request.state wraps it, without building the wrapper.
        request_id=request.scope.get("state", {}).get("request_id", ""),
        client=f"{client.host}:{client.port}" if client else "unix",
        headers=request.headers,
    )


def error_response(exc: VmmError, *, use_json: bool) -> Response:
    return error_payload(exc.message, exc.code, exc.status_code, use_json=use_json)


def error_parts(message: str, code: str, status: int, *, use_json: bool) -> tuple[int, str, bytes]:
    # A message may quote a caller's string; a lone surrogate in it must not fail the reply.
    message = message.encode("utf-8", "backslashreplace").decode()
    if use_json:
        body: dict[str, Any] = {"error": message, "message": message, "code": code}
        return status, JSON_TYPE, json.dumps(body, indent=2, ensure_ascii=False).encode()
    return status, PROTOBUF_TYPE, prpc_pb2.PrpcError(message=message).SerializeToString()


def error_payload(message: str, code: str, status: int, *, use_json: bool) -> Response:
    status, media_type, body = error_parts(message, code, status, use_json=use_json)
    return Response(body, status_code=status, media_type=media_type)
