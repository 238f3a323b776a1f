"""Prometheus metrics at ``/metrics``: what the daemon runs and how its API is used.

Counts that happen as calls (RPCs, guest-channel failures, boot durations) are observed through
narrow callbacks: the pRPC bridges' ``observer`` and the guest hub's ``boot_observer``, so neither
layer knows of Prometheus. Everything else (VMs by status, capacity, auto-restarts, rotated log
bytes) is read from the daemon when scraped, so it can never drift from what Status says.

Each app has its own registry (never prometheus_client's global one): two daemons in one test
process, or an app built twice, do not share or clash over series.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import get_args

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from vmm.daemon import Daemon
from vmm.model.vm import VmStatus
from vmm.vms import log_rotation

# Guest-proxy answers that mean the channel to the agent failed (not a caller's mistake).
GUEST_CHANNEL_FAILURES = frozenset({"UNAVAILABLE", "INTERNAL"})
BOOT_BUCKETS = (5.0, 10.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0, 180.0, 300.0, 600.0)


class Metrics:
    def __init__(self, daemon: Daemon) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.rpc_requests = Counter(
            "vmm_rpc_requests", "Vmm RPCs answered (/prpc and gRPC), by method and result code",
            ["method", "code"], registry=self.registry,
        )
        self.rpc_seconds = Histogram(
            "vmm_rpc_duration_seconds", "Time to answer a Vmm RPC, by method",
            ["method"], registry=self.registry,
        )
        self.boot_seconds = Histogram(
            "vmm_boot_duration_seconds",
            "From a VM's launch to its guest reporting boot progress 'done'",
            buckets=BOOT_BUCKETS, registry=self.registry,
        )
        self.guest_channel_errors = Counter(
            "vmm_guest_channel_errors",
            "Failed exchanges with guests: agent calls through /guest (side=agent) and guest "
            "calls to the host API that could not be answered (side=host_api)",
            ["side", "method"], registry=self.registry,
        )
        self.registry.register(_DaemonState(daemon))
        # The labelled series of each (method, code) seen: ``labels()`` costs more than the
        # increments. Bounded: methods are the service's (or "(unknown)"), codes the error map's.
        self._rpc_series: dict[tuple[str, str], tuple[Counter, Histogram]] = {}

    def observe_rpc(self, method: str, code: str, seconds: float) -> None:
        series = self._rpc_series.get((method, code))
        if series is None:
            series = self._rpc_series[method, code] = (
                self.rpc_requests.labels(method, code), self.rpc_seconds.labels(method))
        series[0].inc()
        series[1].observe(seconds)

    def observe_guest_call(self, method: str, code: str, seconds: float) -> None:
        if code in GUEST_CHANNEL_FAILURES:
            self.guest_channel_errors.labels("agent", method).inc()

    def observe_host_api(self, method: str, code: str, seconds: float) -> None:
        if code in GUEST_CHANNEL_FAILURES:
            self.guest_channel_errors.labels("host_api", method).inc()

    def attach(self, daemon: Daemon) -> None:
        """Hook the parts that exist once the daemon has started (its manager's guest hub)."""
        channels = daemon.manager.channels
        channels.boot_observer = self.boot_seconds.observe
        channels.bridge.observer = self.observe_host_api

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def route(self, path: str = "/metrics") -> Route:
        async def endpoint(request: Request) -> Response:
            body, media_type = self.render()
            return Response(body, media_type=media_type)

        return Route(path, endpoint, methods=["GET"])


class _DaemonState(Collector):
    """What the daemon holds right now, read at each scrape."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    def collect(self) -> Iterator[Metric]:
        try:
            manager = self.daemon.manager
        except RuntimeError:
            return  # not started (or stopping): nothing to report yet
        vms = GaugeMetricFamily("vmm_vms", "VMs by the status Status reports", labels=["status"])
        counts = dict.fromkeys(get_args(VmStatus), 0)
        for vm in list(manager.vms.values()):
            counts[vm.status] += 1
        for status, count in counts.items():
            vms.add_metric([status], count)
        yield vms

        restarts = CounterMetricFamily(
            "vmm_auto_restarts", "Automatic restarts attempted since the daemon started, by outcome",
            labels=["outcome"],
        )
        restarts.add_metric(["restarted"], manager.auto_restart.restarted)
        restarts.add_metric(["failed"], manager.auto_restart.failed)
        yield restarts

        cvm = self.daemon.config.cvm
        usage = self.daemon.resource_usage()
        capacity = GaugeMetricFamily(
            "vmm_host_capacity", "What VMs reserve of the configured limits, and what is left",
            labels=["resource", "state"],
        )
        for resource, used, limit in (("vms", usage.vms, cvm.cid_pool_size),
                                      ("vcpu", usage.vcpu, cvm.max_allocable_vcpu),
                                      ("memory_mb", usage.memory_mb,
                                       cvm.max_allocable_memory_in_mb)):
            capacity.add_metric([resource, "used"], used)
            capacity.add_metric([resource, "free"], max(limit - used, 0))
        yield capacity

        yield CounterMetricFamily(
            "vmm_log_rotated_bytes", "Bytes moved out of live VM logs by rotation ([cvm.log])",
            value=log_rotation.rotated_bytes(),
        )
