"""vmm-cli on a real boot: deploy --wait / start --wait follow the guest to "done", and the
guest's identity line in `vmm-cli logs` carries the compose hash it measured."""

from __future__ import annotations

import hashlib
import itertools
import json
import subprocess

import pytest

from tests.cli_client.harness import run_cli
from tests.support.daemon_proc import running_daemon
from tests.support.guest_image import ensure_guest_image
from tests.support.short_dirs import short_dir

COMPOSE = json.dumps({"manifest_version": 2, "name": "waited", "runner": "docker-compose",
                      "docker_compose_file": "services: {}\n"})
BOOT_TIMEOUT = "300"


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, f"rc={result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


@pytest.mark.qemu
def test_wait_follows_a_real_boot_and_logs_show_the_measured_compose_hash() -> None:
    """deploy --wait and start --wait end at "done"; logs carry the guest's identity JSON line."""
    image = ensure_guest_image()
    with short_dir("vmmw") as workdir, running_daemon(
            workdir, extra_config=f'[image]\npath = "{image.parent}"\n[cvm]\naccel = "tcg"\n'
    ) as daemon:
        home = workdir / "home"
        home.mkdir()
        compose = home / "app-compose.json"
        compose.write_text(COMPOSE)

        def cli(*args: str) -> subprocess.CompletedProcess[str]:
            return run_cli("--url", daemon.base_url, *args, home=home, timeout=400)

        deployed = ok(cli("deploy", "--name", "waited", "--image", image.name, "--compose",
                          str(compose), "--memory", "512M", "--disk", "2G", "--wait",
                          "--wait-timeout", BOOT_TIMEOUT))
        vm_id = deployed.stdout.strip()
        steps = [line.removeprefix(f"{vm_id}: ") for line in deployed.stderr.splitlines()
                 if line.startswith(f"{vm_id}: ")]
        assert steps[-1] == "running done", deployed.stderr
        # The first poll comes right after CreateVm, seconds before the guest kernel is up.
        assert steps[0] == "running booting", steps
        assert all(a != b for a, b in itertools.pairwise(steps)), steps  # one per change

        logs = ok(cli("logs", vm_id, "-n", "2000")).stdout
        identity = [json.loads(line) for line in logs.splitlines() if '"compose_hash"' in line]
        assert len(identity) == 1, logs
        digest = hashlib.sha256(compose.read_bytes()).hexdigest()
        assert identity[0]["compose_hash"] == digest
        assert identity[0]["app_id"] == digest[:40] and identity[0]["app_name"] == "waited"
        info = json.loads(ok(cli("info", vm_id, "--json")).stdout)
        assert identity[0]["instance_id"] == info["instance_id"]

        ok(cli("stop", "-f", vm_id))
        started = ok(cli("start", vm_id, "--wait", "--wait-timeout", BOOT_TIMEOUT))
        assert f"{vm_id}: running done" in started.stdout.splitlines()
        ok(cli("stop", "-f", vm_id))
        ok(cli("remove", vm_id))
