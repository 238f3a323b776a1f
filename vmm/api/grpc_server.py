"""The optional native gRPC listener (``grpc_address``): the Vmm service over grpcio's asyncio server.

It serves the very methods the /prpc bridge serves (``bridge.resolve``: the same servicer
instance, bound once), in the daemon's process and event loop, with the same authentication
(``authorization: Bearer ...``, Basic or ``x-admin-token`` metadata, checked by the
``Authenticator``) and the same errors: each ``VmmError`` code becomes a gRPC status
(``STATUS_OF_CODE``), its message the status details, and the code itself the trailing metadata
``vmm-code`` so a client can tell e.g. VM_NOT_FOUND from NOT_FOUND. Calls are reported to the
bridge's observer, so the metrics count them with the /prpc ones.

The server is created inside the running loop and stopped by the app's lifespan, which uvicorn
runs after its own SIGTERM handling: no gRPC task outlives the daemon. Nothing in the daemon forks
without exec (grpcio cannot survive that).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import Message

from vmm.api.auth import Authenticator
from vmm.core.config import parse_address
from vmm.core.exceptions import OUT_OF_SPACE, ConfigError, StorageError, Unauthorized, VmmError
from vmm.prpc import codec
from vmm.prpc.bridge import CallContext, PrpcBridge

log = logging.getLogger(__name__)

SERVICE = "vmm.Vmm"
GRACE_SECONDS = 2.0

# vmm.core.exceptions codes -> gRPC statuses. A subclass elsewhere with a code of its own (the
# images' BAD_IMAGE) takes its nearest listed ancestor's; tests/api/test_grpc.py checks that every
# error class lands on a status that agrees with its HTTP status.
STATUS_OF_CODE: dict[str, grpc.StatusCode] = {
    "INVALID_ARGUMENT": grpc.StatusCode.INVALID_ARGUMENT,
    "UNKNOWN_METHOD": grpc.StatusCode.UNIMPLEMENTED,
    "DECODE_ERROR": grpc.StatusCode.INVALID_ARGUMENT,
    "PAYLOAD_TOO_LARGE": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "UNAUTHENTICATED": grpc.StatusCode.UNAUTHENTICATED,
    "NOT_FOUND": grpc.StatusCode.NOT_FOUND,
    "VM_NOT_FOUND": grpc.StatusCode.NOT_FOUND,
    "FAILED_PRECONDITION": grpc.StatusCode.FAILED_PRECONDITION,
    "UNSUPPORTED": grpc.StatusCode.FAILED_PRECONDITION,
    "RESOURCE_EXHAUSTED": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "UNAVAILABLE": grpc.StatusCode.UNAVAILABLE,
    "REGISTRY_ERROR": grpc.StatusCode.UNAVAILABLE,
    "STORAGE": grpc.StatusCode.INTERNAL,
    "INSUFFICIENT_STORAGE": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "CONFIG": grpc.StatusCode.INTERNAL,
    "BACKEND": grpc.StatusCode.INTERNAL,
    "SUPERVISOR": grpc.StatusCode.INTERNAL,
    "INTERNAL": grpc.StatusCode.INTERNAL,
}

Handler = Callable[[Message, grpc.aio.ServicerContext[Any, Any]], Awaitable[Message]]


def grpc_target(address: str) -> str:
    """``tcp:HOST:PORT`` / ``unix:PATH`` (our address forms) as grpcio's bind target."""
    kind, where, port = parse_address(address)
    if kind == "unix":
        return f"unix:{where}"
    return f"[{where}]:{port}" if ":" in where else f"{where}:{port}"


class GrpcListener:
    """One grpc.aio server serving ``bridge``'s methods; ``start`` inside the running loop."""

    def __init__(self, bridge: PrpcBridge, authenticator: Authenticator, address: str) -> None:
        self.bridge = bridge
        self.auth = authenticator
        self.address = address
        self._server: grpc.aio.Server | None = None

    async def start(self) -> str:
        """Bind and serve; return where it listens (``tcp:HOST:PORT`` with the bound port)."""
        server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", self.bridge.max_body),
            ("grpc.so_reuseport", 0),  # a port taken by another process is an error, not shared
        ])  # fmt: skip
        handlers = {
            name: grpc.unary_unary_rpc_method_handler(
                self._handler(name),
                request_deserializer=method.input_class.FromString,
                response_serializer=method.output_class.SerializeToString,
            )
            for name, method in self.bridge.methods.items()
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        target = grpc_target(self.address)
        try:
            port = server.add_insecure_port(target)
        except RuntimeError as exc:
            raise ConfigError(f"`grpc_address`: cannot listen on {self.address}: {exc}") from None
        await server.start()
        self._server = server
        kind, where, _ = parse_address(self.address)
        return f"unix:{where}" if kind == "unix" else f"tcp:{where}:{port}"

    async def stop(self) -> None:
        """Refuse new calls, let running ones finish for a moment, then cancel them."""
        if self._server is not None:
            await self._server.stop(GRACE_SECONDS)
            self._server = None

    def _handler(self, name: str) -> Handler:
        method = self.bridge.resolve(name)

        async def handle(request: Message, context: grpc.aio.ServicerContext[Any, Any]) -> Message:
            started, code = time.perf_counter(), "INTERNAL"
            try:
                metadata = {k.lower(): v for k, v in context.invocation_metadata() or ()
                            if isinstance(v, str)}  # fmt: skip
                ctx = CallContext(request_id=metadata.get("x-request-id", ""),
                                  client=context.peer(), headers=metadata)  # fmt: skip
                try:
                    await self._authorize(metadata)
                    result = await method.handler(request, ctx)
                    if isinstance(result, codec.Encoded):  # Status and Version, pre-encoded
                        result = result.message_class.FromString(result.protobuf())
                except OSError as exc:
                    if exc.errno not in OUT_OF_SPACE:
                        raise
                    error = StorageError.of(exc, Path(os.fsdecode(exc.filename or "state")).name)
                    code = error.code
                    await _abort(context, error)
                except VmmError as exc:
                    code = exc.code
                    await _abort(context, exc)
                code = "OK"
                return result
            finally:
                if self.bridge.observer is not None:
                    self.bridge.observer(name, code, time.perf_counter() - started)

        return handle

    async def _authorize(self, metadata: dict[str, str]) -> None:
        if not self.auth.enabled:
            return
        allowed, _ = await self.auth.authorize("POST", metadata, "")
        if not allowed:
            raise Unauthorized("unauthorized: a valid API token or user credential is required")


def grpc_status(error: type[VmmError]) -> grpc.StatusCode:
    """The gRPC status of an error class: its code's, else its nearest ancestor's."""
    for cls in error.__mro__:
        code = getattr(cls, "code", None)
        if isinstance(code, str) and code in STATUS_OF_CODE:
            return STATUS_OF_CODE[code]
    return grpc.StatusCode.INTERNAL


async def _abort(context: grpc.aio.ServicerContext[Any, Any], error: VmmError) -> None:
    context.set_trailing_metadata((("vmm-code", error.code),))
    await context.abort(grpc_status(type(error)), error.message)
