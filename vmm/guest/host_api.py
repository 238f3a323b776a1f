"""The host API guests call: Info, Notify (boot progress, events) and GetSealingKey.

It reaches the daemon two ways, both ending in the same ``PrpcBridge.dispatch``:

* vsock (production): HTTP on ``host_api.port``; the caller's CID names the VM;
* serial (fallback): the daemon connects to the VM's ``host-api.sock`` (QEMU's end of the
  virtio-serial port) and answers the request frames the guest sends; the socket names the VM.

Notify never fails on a guest's behalf: oversized payloads (over 4 KiB) are dropped, unknown
events are stored, and everything lands in the VM's bounded event ring.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from google.protobuf.empty_pb2 import Empty
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from guest_agent.framing import (
    REQUEST,
    RESPONSE,
    FrameDecoder,
    FrameError,
    decode_request,
    encode_frame,
    encode_response,
)
from vmm.core.config import Config
from vmm.core.exceptions import BadRequest, Conflict, Unavailable, VmNotFound
from vmm.core.version import __version__
from vmm.prpc.bridge import JSON_TYPE, CallContext, PrpcBridge, call_context, read_body, wants_json
from vmm.rpc import host_api_pb2 as hpb

if TYPE_CHECKING:
    from vmm.model.vm import Vm

log = logging.getLogger(__name__)

MAX_NOTIFY_PAYLOAD = 4096
MAX_QUOTE = 1024 * 1024
KEY_PROVIDER_TIMEOUT = 10.0


class HostApiServicer:
    """The host API a guest calls; ``notify`` applies a notification to the calling VM."""

    def __init__(
        self,
        config: Config,
        *,
        lookup: Callable[[str], Vm | None],
        notify: Callable[[Vm, str, str], Awaitable[None]],
    ) -> None:
        self.config = config
        self._lookup = lookup
        self._notify = notify

    def _vm(self, ctx: CallContext) -> Vm:
        vm = self._lookup(ctx.vm_id)
        if vm is None:
            raise VmNotFound(ctx.vm_id or "<unknown caller>")
        return vm

    async def Info(self, request: Empty, ctx: CallContext) -> hpb.HostInfo:
        return hpb.HostInfo(name=self.config.host_api.ident, version=__version__)

    async def Notify(self, request: hpb.Notification, ctx: CallContext) -> Empty:
        vm = self._vm(ctx)
        if len(request.payload.encode()) > MAX_NOTIFY_PAYLOAD:
            log.info("VM %s: dropped %s notification over %d bytes", vm.id, request.event,
                     MAX_NOTIFY_PAYLOAD)
            return Empty()
        await self._notify(vm, request.event, request.payload)
        return Empty()

    async def GetSealingKey(
        self, request: hpb.GetSealingKeyRequest, ctx: CallContext
    ) -> hpb.GetSealingKeyResponse:
        self._vm(ctx)
        provider = self.config.key_provider
        if not provider.enabled:
            raise Conflict("Key provider is not enabled")
        if len(request.quote) > MAX_QUOTE:
            raise BadRequest(f"quote larger than {MAX_QUOTE} bytes")
        return await ask_key_provider(provider.address, provider.port, request.quote)


async def ask_key_provider(address: str, port: int, quote: bytes) -> hpb.GetSealingKeyResponse:
    """The key-provider protocol: 4-byte big-endian length + JSON, each way."""
    request = json.dumps({"quote": list(quote)}).encode()
    try:
        async with asyncio.timeout(KEY_PROVIDER_TIMEOUT):
            reader, writer = await asyncio.open_connection(address, port)
            try:
                writer.write(struct.pack(">I", len(request)) + request)
                await writer.drain()
                (length,) = struct.unpack(">I", await reader.readexactly(4))
                if length > 4 * MAX_QUOTE:
                    raise ValueError(f"answer of {length} bytes is too large")
                answer = json.loads(await reader.readexactly(length))
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
        return hpb.GetSealingKeyResponse(
            encrypted_key=bytes(answer["encrypted_key"]),
            provider_quote=bytes(answer["provider_quote"]),
        )
    except TimeoutError:
        raise Unavailable(f"key provider at {address}:{port} did not answer in time") from None
    except (OSError, asyncio.IncompleteReadError) as exc:
        raise Unavailable(f"key provider at {address}:{port} is unreachable: {exc}") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise Unavailable(f"key provider at {address}:{port} sent a bad answer: {exc}") from None


class HostApiLink:
    """The daemon's end of one VM's serial host-API port: connect, answer frames, reconnect."""

    def __init__(self, vm_id: str, socket_path: Path, bridge: PrpcBridge) -> None:
        self.vm_id = vm_id
        self.socket_path = socket_path
        self.bridge = bridge
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None

    async def _run(self) -> None:
        delay = 0.1
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(str(self.socket_path))
            except OSError:
                await asyncio.sleep(delay)  # QEMU is not up yet, or is gone: try again
                delay = min(delay * 2, 2.0)
                continue
            delay = 0.1
            try:
                await self._serve(reader, writer)
            except (OSError, ConnectionError):
                pass
            finally:
                writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        decoder = FrameDecoder()
        ctx = CallContext(request_id="", client=f"vm:{self.vm_id}", headers={}, vm_id=self.vm_id)
        while data := await reader.read(65536):
            for frame in decoder.feed(data):
                if frame.kind != REQUEST:
                    continue
                status, media_type, body = await self._answer(frame.payload, ctx)
                writer.write(encode_frame(RESPONSE, frame.id, encode_response(status, media_type, body)))
                await writer.drain()

    async def _answer(self, payload: bytes, ctx: CallContext) -> tuple[int, str, bytes]:
        try:
            path, content_type, body = decode_request(payload)
        except FrameError as exc:
            return 400, JSON_TYPE, json.dumps({"error": str(exc)}).encode()
        parts = urlsplit(path)
        method = parts.path.removeprefix("/api/")
        query = dict(p.partition("=")[::2] for p in parts.query.split("&") if p)
        use_json = ("json" in query and query["json"] in ("", "true", "1")) or "json" in content_type
        return await self.bridge.dispatch(method, body, use_json=use_json, ctx=ctx)


def host_api_app(bridge: PrpcBridge, vm_for_peer: Callable[[str], str | None], max_body: int) -> Starlette:
    """The vsock HTTP server's app: ``/api/<Method>``, the peer's CID naming the VM."""

    async def endpoint(request: Request) -> Response:
        use_json = wants_json(request)
        ctx = call_context(request)
        peer = request.client.host if request.client else ""
        vm_id = vm_for_peer(peer)
        if vm_id is None:
            return Response(b'{"error": "invalid remote endpoint"}', 400, media_type=JSON_TYPE)
        body = b"" if request.method == "GET" else await read_body(request, max_body)
        status, media_type, payload = await bridge.dispatch(
            request.path_params["method"], body, use_json=use_json,
            ctx=CallContext(ctx.request_id, ctx.client, ctx.headers, vm_id=vm_id),
            query=request.url.query if request.method == "GET" else None,
        )
        return Response(payload, status_code=status, media_type=media_type)

    return Starlette(routes=[Route("/api/{method}", endpoint, methods=["GET", "POST"])])
