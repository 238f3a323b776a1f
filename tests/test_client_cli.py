"""vmm-cli against the real daemon: listing, deploy, lifecycle, logs, auth, errors."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.daemon_proc import DaemonProcess, checkout_env
from tests.support.idle_image import IDLE_IMAGE
from tests.support.short_dirs import short_dir
from tests.support.vm_ops import idle_daemon, status_of, wait_for
from vmm.client_cli import _port, _size_gb, _size_mb

TOKEN = "cli-token"


@pytest.fixture(scope="module")
def daemon() -> Iterator[DaemonProcess]:
    with short_dir("vmmc") as workdir, idle_daemon(
        workdir, extra=f'[auth]\nenabled = true\ntokens = ["{TOKEN}"]\n'
    ) as proc:
        yield proc


def cli(daemon: DaemonProcess, *args: str, url: str | None = None,
        token: str = TOKEN) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vmm.client_cli", "--url", url or daemon.base_url,
         "--token", token, *args],
        capture_output=True, text=True, timeout=120, check=False, env=checkout_env(),
    )


def test_deploy_list_info_and_lifecycle(daemon: DaemonProcess, tmp_path: Path) -> None:
    """deploy creates a VM; lsvm, info, stop -f, start and remove act on it."""
    compose = tmp_path / "app-compose.json"
    compose.write_text(json.dumps({"runner": "docker-compose"}))
    deployed = cli(daemon, "deploy", "--name", "cli-vm", "--image", IDLE_IMAGE, "--compose",
                   str(compose), "--memory", "256M", "--disk", "1G", "--port", "tcp:20080:80")
    assert deployed.returncode == 0, deployed.stderr
    vm_id = deployed.stdout.strip()
    with daemon.client(headers={"Authorization": f"Bearer {TOKEN}"}) as client:
        wait_for("running", lambda: status_of(client, vm_id) == "running")
        listed = cli(daemon, "lsvm", "-v")
        assert vm_id in listed.stdout and "cli-vm" in listed.stdout and "256M" in listed.stdout
        as_json = json.loads(cli(daemon, "lsvm", "--json").stdout)
        assert [vm["id"] for vm in as_json] == [vm_id]
        info = json.loads(cli(daemon, "info", vm_id, "--json").stdout)
        assert info["configuration"]["ports"][0]["host_port"] == 20080
        assert cli(daemon, "stop", "-f", vm_id).returncode == 0
        assert status_of(client, vm_id) == "stopped"
        assert cli(daemon, "start", vm_id).returncode == 0
        wait_for("running again", lambda: status_of(client, vm_id) == "running")
        logs = cli(daemon, "logs", vm_id, "-n", "200")
        assert logs.returncode == 0 and "===== boot @" in logs.stdout
        assert cli(daemon, "remove", vm_id).returncode == 0


def test_unix_socket_url_and_images(daemon: DaemonProcess) -> None:
    """unix:/path URLs work; lsimage and version print what the daemon says."""
    # The module daemon listens on TCP only; talk to it the way an operator on the box would.
    images = cli(daemon, "lsimage")
    assert images.returncode == 0 and IDLE_IMAGE in images.stdout
    assert cli(daemon, "version").stdout.startswith("0.1.0 (")
    missing = cli(daemon, "version", url="unix:/nonexistent/vmm.sock")
    assert missing.returncode == 1 and "cannot reach the VMM" in missing.stderr


def test_errors_are_one_line_and_exit_1(daemon: DaemonProcess) -> None:
    """A refused call prints the daemon's message and exits 1; bad auth is refused."""
    unknown = cli(daemon, "info", "no-such-vm")
    assert unknown.returncode == 1 and "VM not found: no-such-vm" in unknown.stderr
    bad = cli(daemon, "start", "no-such-vm")
    assert bad.returncode == 1 and "StartVm failed: VM not found" in bad.stderr
    denied = cli(daemon, "lsvm", token="wrong")
    assert denied.returncode == 1 and "unauthorized" in denied.stderr


@pytest.mark.parametrize(("text", "mb"), [("1024", 1024), ("2G", 2048), ("512M", 512), ("1T", 1048576)])
def test_memory_sizes(text: str, mb: int) -> None:
    """Memory sizes: bare numbers are MB; M, G and T suffixes scale."""
    assert _size_mb(text) == mb


def test_disk_and_port_parsing() -> None:
    """Disk sizes are GB; ports are proto[:addr]:host:vm; bad forms are refused."""
    assert _size_gb("20") == 20 and _size_gb("1T") == 1024
    assert _port("tcp:8080:80") == {"protocol": "tcp", "host_address": "", "host_port": 8080,
                                    "vm_port": 80}
    assert _port("udp:0.0.0.0:53:53")["host_address"] == "0.0.0.0"
    for bad in ("1.5G", "lots"):
        with pytest.raises(argparse.ArgumentTypeError, match="bad"):
            _size_mb(bad)
    for bad in ("sctp:1:2", "tcp:80", "tcp:a:b"):
        with pytest.raises(argparse.ArgumentTypeError, match="bad"):
            _port(bad)
