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
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol

from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from starlette.datastructures import Headers, QueryParams
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

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
MEDIA_TYPES = {JSON_TYPE: JSON_TYPE.encode(), PROTOBUF_TYPE: PROTOBUF_TYPE.encode()}

# (method, code, seconds) of one answered call.
CallObserver = Callable[[str, str, float], None]


class CallContext(NamedTuple):
    """What a servicer may want to know about the caller.

    A named tuple (immutable, like a frozen dataclass) because every call builds one, and a
    frozen dataclass's ``__init__`` costs several times a tuple's.
    """

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
        # An ASGI app rather than a request handler: Starlette wraps a handler in a Request, an
        # exception-handling layer (for HTTPException, which the bridge never raises) and a
        # Response object per call, which together cost more than the bridge's own work on a
        # small call. What escapes the bridge still reaches the app's handlers and middleware.
        return Route(f"{mount}/{{method}}", _BridgeApp(self), methods=["GET", "POST"])

    def resolve(self, name: str) -> _Method:
        for prefix in self.strip_prefixes:
            while name.startswith(prefix):
                name = name[len(prefix) :]
        method = self.methods.get(name)
        if method is None:
            raise UnknownMethod(name)
        return method

    async def answer(self, scope: Scope, receive: Receive) -> tuple[int, str, bytes]:
        """(status, media type, body) for one HTTP call routed to ``<mount>/<Method>``.

        Works on the ASGI scope itself: a starlette Request is built only for a GET's query.
        """
        content_type, declared = _content_headers(scope["headers"])
        use_json = _wants_json(scope, content_type)
        query: str | None = None
        body = b""
        # The claim lasts until the handler is done: the body (and what is decoded from it) is
        # held in memory all that time. Released in ``finally`` rather than by ``async with``:
        # every request takes one, and a context manager's two awaits cost more than the rest.
        claim = None if self.body_budget is None else BodyClaim(self.body_budget)
        try:
            if scope["method"] == "GET":
                query = Request(scope, receive).url.query
            else:
                try:
                    body = await read_declared_body(receive, declared, self.max_body, claim)
                except VmmError as exc:
                    return error_parts(exc.message, exc.code, exc.status_code, use_json=use_json)
            return await self.dispatch(
                scope["path_params"]["method"], body, use_json=use_json,
                ctx=_call_context(scope), query=query,
            )
        finally:
            if claim is not None:
                claim.release()

    async def dispatch(
        self, name: str, body: bytes, *, use_json: bool, ctx: CallContext, query: str | None = None
    ) -> tuple[int, str, bytes]:
        """Decode, call and encode one RPC: (status, media type, body). Shared by every transport."""
        started, code = time.perf_counter(), "INTERNAL"  # stays so if the handler has a bug
        label = UNKNOWN_METHOD  # the method's name once it resolves
        try:
            method = self.resolve(name)
            label = method.name
            if query is not None:
                message = codec.from_query_string(query, method.input_class)
            elif use_json:
                message = codec.from_json_bytes(body, method.input_class)
            else:
                message = codec.from_protobuf_bytes(body, method.input_class)
            gate = self.read_gate
            # Reads queue under load; other calls never do. A read the gate lets in at once
            # skips ``ReadGate.run``: one coroutine less on the hot path, the same count.
            if gate is None or gate.admit_now(label):
                result = await method.handler(message, ctx)
            else:
                result = await gate.run(label, method.handler(message, ctx))
            if isinstance(result, codec.Encoded) and result.message_class is method.output_class:
                code = "OK"
                if use_json:
                    return 200, JSON_TYPE, result.json()
                return 200, PROTOBUF_TYPE, result.protobuf()
            if not isinstance(result, method.output_class):
                raise TypeError(
                    f"{method.name} returned {type(result).__name__}, "
                    f"expected {method.output_class.__name__}"
                )
            answer = (200, JSON_TYPE, codec.to_json_bytes(result)) if use_json else \
                (200, PROTOBUF_TYPE, result.SerializeToString())
            code = "OK"
            return answer
        except VmmError as exc:
            code = exc.code
            return error_parts(exc.message, exc.code, exc.status_code, use_json=use_json)
        except OSError as exc:
            if exc.errno not in OUT_OF_SPACE:
                raise
            # Any write of state can meet a full disk (vm-state.json at StopVm, serial.log at
            # StartVm); each is the same condition for the caller, whichever call hit it.
            error = StorageError.of(exc, _short_path(exc.filename))
            log.warning("%s: %s", name, error.message)
            code = error.code
            return error_parts(error.message, error.code, error.status_code, use_json=use_json)
        except asyncio.CancelledError:
            code = "CANCELLED"  # the caller left, or the daemon is stopping
            raise
        finally:
            if self.observer is not None:
                self.observer(label, code, time.perf_counter() - started)


class _BridgeApp:
    """A bridge's route as an ASGI app (Starlette calls an instance, not a function, as one)."""

    def __init__(self, bridge: PrpcBridge) -> None:
        self.bridge = bridge

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        status, media_type, payload = await self.bridge.answer(scope, receive)
        # The headers a starlette Response with this media type would carry, in its order.
        await send({
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-length", str(len(payload)).encode()),
                        (b"content-type", MEDIA_TYPES[media_type])],
        })
        await send({"type": "http.response.body", "body": payload})


def _short_path(filename: object) -> str:
    """The file's last two components (a VM id and a file name): never a whole host path."""
    if not isinstance(filename, str | bytes):
        return "state"
    return "/".join(Path(os.fsdecode(filename)).parts[-2:])


def _content_headers(raw: list[tuple[bytes, bytes]]) -> tuple[str, str | None]:
    """(Content-Type without parameters, lower-cased; Content-Length or None) in one pass.

    Starlette's ``Headers.get`` walks every header and decodes each one per lookup; a call
    needs just these two. The first of a repeated header counts, as with ``Headers.get``.
    """
    content_type: str | None = None
    length: str | None = None
    for key, value in raw:
        if key == b"content-type" and content_type is None:
            content_type = value.decode("latin-1").split(";")[0].strip().lower()
        elif key == b"content-length" and length is None:
            length = value.decode("latin-1")
    return content_type or "", length


def wants_json(request: Request) -> bool:
    """Whether the call is JSON: a GET, ``?json`` (empty, true or 1), or a JSON content type."""
    return _wants_json(request.scope, _content_headers(request.scope["headers"])[0])


def _wants_json(scope: Scope, content_type: str) -> bool:
    if scope["method"] == "GET":
        return True
    raw_query: bytes = scope.get("query_string", b"")
    # Parsing the query costs more than the rest of a small call: only when it may say json.
    if (b"json" in raw_query or b"%" in raw_query) and \
            QueryParams(raw_query).get("json", None) in ("", "true", "1"):
        return True
    return content_type in (JSON_TYPE, "text/json") or content_type.endswith("+json")


async def read_body(request: Request, limit: int, claim: BodyClaim | None = None) -> bytes:
    """Read the request body, refusing (and reading no further) past ``limit`` bytes.

    With a ``claim``, the bytes are counted against the process-wide body budget first.
    """
    return await read_declared_body(
        request.receive, request.headers.get("content-length"), limit, claim)


async def read_declared_body(receive: Receive, declared: str | None, limit: int,
                             claim: BodyClaim | None = None) -> bytes:
    """``read_body`` given the Content-Length header (None when absent) and the ASGI receive."""
    if declared is not None and declared.isdigit():
        if int(declared) > limit:
            raise PayloadTooLarge(f"payload too large: {declared} bytes (limit {limit})")
        if claim is not None and not claim.cover_now(int(declared)):
            await claim.cover(int(declared))
    chunks: list[bytes] = []
    size = 0
    # ASGI messages read directly: Request.stream() is an async generator, which costs more
    # than the rest of reading a small body.
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
            # Usually covered already, by the declared length.
            if claim is not None and size > claim.held and not claim.cover_now(size):
                await claim.cover(size)
            chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def call_context(request: Request) -> CallContext:
    return _call_context(request.scope)


def _call_context(scope: Scope) -> CallContext:
    client = scope.get("client")
    return CallContext(
        # The scope's state dict, as Request.state wraps it, without building the wrapper.
        request_id=scope.get("state", {}).get("request_id", ""),
        client=f"{client[0]}:{client[1]}" if client else "unix",
        headers=Headers(scope=scope),  # what Request.headers is
    )


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
