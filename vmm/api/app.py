"""The ASGI application: routes, middleware and the daemon's lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response

from guest_proxy.proxy import GuestProxyServicer
from vmm.api.auth import AuthMiddleware
from vmm.api.console import console_routes
from vmm.api.events import events_route
from vmm.api.grpc_server import GrpcListener
from vmm.api.logs import logs_route
from vmm.api.metrics import Metrics
from vmm.api.middleware import RequestIdMiddleware
from vmm.api.openapi import api_docs_routes
from vmm.api.server import describe, extra_listener, serve_quietly
from vmm.api.servicer import VmmServicer
from vmm.daemon import Daemon
from vmm.prpc.body_budget import BodyBudget
from vmm.prpc.bridge import PrpcBridge, error_payload
from vmm.prpc.fairness import ReadGate, favour_worker_threads
from vmm.rpc import guest_api_pb2, vmm_rpc_pb2

# Vmm methods that only report: under load they take turns (``ReadGate``) so that every other
# call, which changes something, gets the loop at once. A method missing here is never delayed.
READ_METHODS = frozenset({
    "Status", "GetInfo", "Version", "GetMeta", "ListImages", "ListGpus", "SvList",
    "GetComposeHash", "GetAppEnvEncryptPubKey", "ListRegistryImages",
})


log = logging.getLogger(__name__)


@contextlib.asynccontextmanager
async def extra_listeners(daemon: Daemon, vmm_bridge: PrpcBridge,
                          metrics: Metrics) -> AsyncIterator[None]:
    """The optional listeners beside ``address``: /metrics without auth, and native gRPC.

    Started once the daemon has started and stopped before it stops, inside uvicorn's lifespan,
    so SIGTERM (which only asks uvicorn to exit) ends them too.
    """
    config = daemon.config
    async with contextlib.AsyncExitStack() as stack:
        if config.metrics_address:
            sock = stack.enter_context(extra_listener(config.metrics_address, "metrics_address"))
            metrics_app = Starlette(routes=[metrics.route()])
            task = asyncio.create_task(serve_quietly(metrics_app, [sock], config.server))
            stack.push_async_callback(_cancel, task)
            log.info("metrics (no auth) on %s", describe(sock))
        if config.grpc_address:
            grpc_listener = GrpcListener(vmm_bridge, daemon.authenticator, config.grpc_address)
            where = await grpc_listener.start()
            stack.push_async_callback(grpc_listener.stop)
            log.info("gRPC on %s", where)
        yield


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def build_app(daemon: Daemon) -> Starlette:
    config = daemon.config
    # One budget for both mounts: it bounds the memory of all bodies in flight together.
    body_budget = BodyBudget(config.server.body_memory, config.server.body_memory_wait)
    vmm_bridge = PrpcBridge(
        vmm_rpc_pb2.DESCRIPTOR.services_by_name["Vmm"],
        VmmServicer(daemon),
        max_body=config.max_request_body,
        strip_prefixes=("Teepod.",),
        body_budget=body_budget,
        read_gate=ReadGate(READ_METHODS),
    )

    guest_bridge = PrpcBridge(
        guest_api_pb2.DESCRIPTOR.services_by_name["ProxiedGuestApi"],
        GuestProxyServicer(lambda vm_id: daemon.manager.agent_for(vm_id),  # noqa: PLW0108
                           host_nics=lambda vm_id: daemon.manager.report.host_nics(vm_id)),  # noqa: PLW0108
        max_body=config.max_request_body,
        body_budget=body_budget,
    )

    metrics = Metrics(daemon)
    vmm_bridge.observer = metrics.observe_rpc
    guest_bridge.observer = metrics.observe_guest_call

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        favour_worker_threads()
        await daemon.start()
        try:
            metrics.attach(daemon)
            async with extra_listeners(daemon, vmm_bridge, metrics):
                yield
        finally:
            await daemon.stop()

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 404:
            message = f"no such route: {request.method} {request.url.path}"
            code = "NOT_FOUND"
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
            code = "METHOD_NOT_ALLOWED"
        else:
            message, code = str(exc.detail), "HTTP_ERROR"
        response = error_payload(message, code, exc.status_code, use_json=True)
        if exc.headers:
            response.headers.update(exc.headers)
        return response

    return Starlette(
        routes=[
            vmm_bridge.route("/prpc"),
            guest_bridge.route("/guest"),
            metrics.route(),
            # Late-bound: the manager exists only once the lifespan has started the daemon.
            logs_route(lambda vm_id: daemon.manager.workdir_of(vm_id)),  # noqa: PLW0108
            events_route(lambda: daemon.manager.events),
            *api_docs_routes(),
            *console_routes(),
        ],
        middleware=[
            Middleware(RequestIdMiddleware),
            Middleware(AuthMiddleware, authenticator=daemon.authenticator),
        ],
        exception_handlers={HTTPException: http_error},
        lifespan=lifespan,
    )
