"""/metrics: Prometheus text that prometheus_client's parser reads, behind auth on the API
listeners and without it on ``metrics_address``, with counters that follow what happened."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import vm_ops
from tests.support.daemon_proc import DaemonProcess, start_daemon
from tests.support.guest_image import ensure_guest_image
from tests.support.short_dirs import short_dir
from tests.support.vm_ops import call, free_port, rpc, status_of, vm_info
from tests.vms.test_manager import create, qemu_config

TOKEN = "metrics-test-token"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(client: httpx.Client, path: str = "/metrics", **kwargs: object) -> Samples:
    response = client.get(path, **kwargs)  # type: ignore[arg-type]
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def auth_config(metrics_port: int) -> str:
    return (f'metrics_address = "tcp:127.0.0.1:{metrics_port}"\n'
            f'[auth]\nenabled = true\ntokens = ["{TOKEN}"]\n')


@pytest.fixture
def workdir() -> Iterator[Path]:
    with short_dir("vmmt") as path:
        yield path


def test_metrics_auth_listener_and_rpc_counters(workdir: Path) -> None:
    """/metrics needs auth on the API listener but not on metrics_address, and RPCs are counted
    by method and code (unknown method names under one label)."""
    metrics_port = free_port()
    daemon = start_daemon(workdir, extra_config=auth_config(metrics_port))
    try:
        headers = {"authorization": f"Bearer {TOKEN}"}
        with daemon.client(headers=headers) as client, \
                httpx.Client(base_url=f"http://127.0.0.1:{metrics_port}", timeout=30) as open_:
            assert httpx.get(f"{daemon.base_url}/metrics", timeout=30).status_code == 401
            assert f"metrics (no auth) on tcp:127.0.0.1:{metrics_port}" in daemon.log()
            before = scrape(client)
            for _ in range(3):
                rpc(client, "Version")
            assert call(client, "StopVm", {"id": "not a vm id!"}).status_code == 400
            assert call(client, "NoSuchMethod").status_code == 400
            # The unauthenticated listener serves /metrics only.
            assert open_.post("/prpc/Version?json", json={}).status_code == 404
            after = scrape(open_)
            requests = "vmm_rpc_requests_total"
            assert value(after, requests, method="Version", code="OK") - \
                value(before, requests, method="Version", code="OK") == 3
            assert value(after, requests, method="StopVm", code="INVALID_ARGUMENT") == 1
            assert value(after, requests, method="(unknown)", code="UNKNOWN_METHOD") == 1
            assert value(after, "vmm_rpc_duration_seconds_count", method="Version") >= 3
            assert value(after, "vmm_vms", status="running") == 0
            assert value(after, "vmm_host_capacity", resource="vcpu", state="used") == 0
            assert value(after, "vmm_host_capacity", resource="vcpu", state="free") == 20
    finally:
        daemon.destroy()


@pytest.mark.qemu
def test_metrics_follow_a_vm_lifecycle(workdir: Path) -> None:
    """Boot durations, VMs by status, capacity, guest channel errors, auto-restarts and rotated
    log bytes move as a real VM boots, pauses, is killed and restarted, and is removed."""
    image_dir = ensure_guest_image()
    restart = ("[cvm.auto_restart]\nenabled = true\ninterval = 1\ninitial_backoff = 1\n"
               "max_backoff = 2\n")
    metrics_port = free_port()
    config = auth_config(metrics_port) + qemu_config(image_dir, extra=restart)
    daemon: DaemonProcess = start_daemon(workdir, extra_config=config)
    try:
        headers = {"authorization": f"Bearer {TOKEN}"}
        with daemon.client(headers=headers) as client, \
                httpx.Client(base_url=f"http://127.0.0.1:{metrics_port}", timeout=30) as open_:
            def boots_done() -> float:
                return value(scrape(open_), "vmm_boot_duration_seconds_count")

            vm_id = create(client, image_dir.name)
            vm_ops.wait_for("boot progress 'done'",
                            lambda: vm_info(client, vm_id)["boot_progress"] == "done", 180)
            vm_ops.wait_for("the boot in the histogram", lambda: boots_done() == 1, 10)
            first = scrape(client)
            assert 0 < value(first, "vmm_boot_duration_seconds_sum") < 180
            assert value(first, "vmm_vms", status="running") == 1
            assert value(first, "vmm_host_capacity", resource="vms", state="used") == 1
            assert value(first, "vmm_host_capacity", resource="memory_mb", state="used") == 512
            assert value(first, "vmm_host_capacity", resource="vcpu", state="free") == 19
            assert value(first, "vmm_rpc_requests_total", method="CreateVm", code="OK") == 1
            assert value(first, "vmm_log_rotated_bytes_total") == 0

            # A paused guest cannot answer its agent: a guest channel error.
            rpc(client, "PauseVm", {"id": vm_id})
            assert value(scrape(open_), "vmm_vms", status="paused") == 1
            answer = client.post("/guest/SysInfo?json", json={"id": vm_id})
            assert answer.status_code == 503, answer.text
            errors = scrape(open_)
            assert value(errors, "vmm_guest_channel_errors_total", side="agent",
                         method="SysInfo") == 1
            rpc(client, "ResumeVm", {"id": vm_id})

            # Killed behind the daemon's back: auto-restart brings it back, the new boot is
            # timed, and the start rotated the first boot's serial log.
            pid = vm_ops.qemu_pid_of(workdir / "state" / "vm" / vm_id)
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            vm_ops.wait_for("the automatic restart", lambda: value(
                scrape(open_), "vmm_auto_restarts_total", outcome="restarted") == 1, 60)
            vm_ops.wait_for("the second boot in the histogram", lambda: boots_done() == 2, 180)
            restarted = scrape(open_)
            assert value(restarted, "vmm_auto_restarts_total", outcome="failed") == 0
            assert value(restarted, "vmm_log_rotated_bytes_total") > 0

            rpc(client, "RemoveVm", {"id": vm_id})
            vm_ops.wait_for("the VM to go", lambda: status_of(client, vm_id) == "gone", 60)
            gone = scrape(open_)
            assert sum(v for (name, _), v in gone.items() if name == "vmm_vms") == 0
            assert value(gone, "vmm_host_capacity", resource="vms", state="used") == 0
    finally:
        daemon.destroy()
