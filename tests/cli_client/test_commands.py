"""vmm-cli against the real daemon: every command, settings, unix: URLs and errors."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cli_client.harness import TOKEN, cli_daemon, run_cli
from tests.support.daemon_proc import DaemonProcess, checkout_env
from tests.support.idle_image import IDLE_IMAGE
from tests.support.kms_peer import SIGNER
from tests.support.vm_ops import status_of, wait_for

COMPOSE = json.dumps({"manifest_version": 2, "name": "cli", "runner": "docker-compose",
                      "docker_compose_file": "services: {}\n"})


@pytest.fixture(scope="module")
def daemon() -> Iterator[DaemonProcess]:
    with cli_daemon() as proc:
        yield proc


def cli(daemon: DaemonProcess, home: Path, *args: str, url: str | None = None,
        token: str = TOKEN) -> subprocess.CompletedProcess[str]:
    return run_cli("--url", url or daemon.base_url, "--token", token, *args, home=home)


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"rc={result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def deploy(daemon: DaemonProcess, home: Path, name: str, *extra: str) -> str:
    compose = home / f"{name}.json"
    compose.write_text(COMPOSE)
    return ok(cli(daemon, home, "deploy", "--name", name, "--image", IDLE_IMAGE, "--compose",
                  str(compose), "--memory", "256M", "--disk", "1G", *extra)).strip()


def info(daemon: DaemonProcess, home: Path, vm_id: str) -> dict[str, object]:
    answer: dict[str, object] = json.loads(ok(cli(daemon, home, "info", vm_id, "--json")))
    return answer


def test_deploy_list_info_and_lifecycle(daemon: DaemonProcess, tmp_path: Path) -> None:
    """deploy creates a VM; lsvm, info, stop -f, start, logs and remove act on it."""
    compose = tmp_path / "app-compose.json"
    compose.write_text(json.dumps({"runner": "docker-compose"}))
    deployed = cli(daemon, tmp_path, "deploy", "--name", "cli-vm", "--image", IDLE_IMAGE,
                   "--compose", str(compose), "--memory", "256M", "--disk", "1G",
                   "--port", "tcp:20080:80")
    vm_id = ok(deployed).strip()
    assert f"compose hash: {hashlib.sha256(compose.read_bytes()).hexdigest()}" in deployed.stderr
    with daemon.client(headers={"Authorization": f"Bearer {TOKEN}"}) as client:
        wait_for("running", lambda: status_of(client, vm_id) == "running")
        listed = ok(cli(daemon, tmp_path, "lsvm", "-v"))
        assert vm_id in listed and "cli-vm" in listed and "256M" in listed and "GPUs" in listed
        as_json = json.loads(ok(cli(daemon, tmp_path, "lsvm", "--json")))
        assert vm_id in [vm["id"] for vm in as_json]
        shown = info(daemon, tmp_path, vm_id)
        assert shown["configuration"]["ports"][0] == {  # type: ignore[index]
            "protocol": "tcp", "host_address": "127.0.0.1", "host_port": 20080, "vm_port": 80,
            "nic": 0}
        assert "port               tcp:127.0.0.1:20080 -> 80" in ok(cli(daemon, tmp_path, "info", vm_id))
        assert ok(cli(daemon, tmp_path, "stop", "-f", vm_id)) == f"StopVm {vm_id}: ok\n"
        assert status_of(client, vm_id) == "stopped"
        ok(cli(daemon, tmp_path, "start", vm_id))
        wait_for("running again", lambda: status_of(client, vm_id) == "running")
        assert "===== boot @" in ok(cli(daemon, tmp_path, "logs", vm_id, "-n", "200"))
        ok(cli(daemon, tmp_path, "remove", vm_id))
        wait_for("removed", lambda: status_of(client, vm_id) == "gone")


def test_pause_resume_and_log_level(daemon: DaemonProcess, tmp_path: Path) -> None:
    """pause/resume drive PauseVm/ResumeVm (Status paused, then running); log-level sets and shows."""
    vm_id = deploy(daemon, tmp_path, "pausable")
    with daemon.client(headers={"Authorization": f"Bearer {TOKEN}"}) as client:
        wait_for("running", lambda: status_of(client, vm_id) == "running")
        # QEMU answers QMP a moment after it starts: the first pause may find it not yet ready.
        wait_for("paused", lambda: cli(daemon, tmp_path, "pause", vm_id).returncode == 0
                 and status_of(client, vm_id) == "paused")
        assert ok(cli(daemon, tmp_path, "resume", vm_id)) == f"ResumeVm {vm_id}: ok\n"
        assert status_of(client, vm_id) == "running"
    refused = cli(daemon, tmp_path, "pause", "no-such-vm")
    assert refused.returncode == 1 and "no-such-vm" in refused.stderr
    assert ok(cli(daemon, tmp_path, "log-level", "debug")) == "debug\n"
    assert ok(cli(daemon, tmp_path, "log-level")) == "debug\n"
    assert ok(cli(daemon, tmp_path, "log-level", "info")) == "info\n"
    ok(cli(daemon, tmp_path, "remove", vm_id))


def test_graceful_stop_is_shutdown_vm(daemon: DaemonProcess, tmp_path: Path) -> None:
    """stop without -f calls ShutdownVm; the VM ends up stopped."""
    vm_id = deploy(daemon, tmp_path, "graceful")
    with daemon.client(headers={"Authorization": f"Bearer {TOKEN}"}) as client:
        wait_for("running", lambda: status_of(client, vm_id) == "running")
        assert ok(cli(daemon, tmp_path, "stop", vm_id)) == f"ShutdownVm {vm_id}: ok\n"
        shown = info(daemon, tmp_path, vm_id)
        assert ("vmm.shutdown", "ACPI power button pressed") in [
            (e["event"], e["body"]) for e in shown["events"]]  # type: ignore[attr-defined]
        wait_for("stopped", lambda: status_of(client, vm_id) == "stopped", timeout=60)
    ok(cli(daemon, tmp_path, "remove", vm_id))


def test_logs_follow_streams_until_interrupted(daemon: DaemonProcess, tmp_path: Path) -> None:
    """logs -f keeps the stream open and prints the console as it comes."""
    vm_id = deploy(daemon, tmp_path, "follow")
    proc = subprocess.Popen(
        [sys.executable, "-m", "vmm.cli_client", "--url", daemon.base_url, "--token", TOKEN,
         "logs", vm_id, "-f", "-n", "50"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**checkout_env(), "HOME": str(tmp_path)},
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()  # blocks until the first line arrives
        assert line, proc.stderr.read().decode() if proc.stderr else ""
        time.sleep(0.5)
        assert proc.poll() is None  # still following
    finally:
        proc.kill()
        proc.wait(timeout=10)
        for stream in (proc.stdout, proc.stderr):
            if stream:
                stream.close()
    ok(cli(daemon, tmp_path, "stop", "-f", vm_id))
    ok(cli(daemon, tmp_path, "remove", vm_id))


def test_resize_and_the_update_commands(daemon: DaemonProcess, tmp_path: Path) -> None:
    """resize, update-app-compose, update-user-config, update-ports and update change the VM."""
    vm_id = deploy(daemon, tmp_path, "upd", "--stopped", "--port", "tcp:20090:90")
    ok(cli(daemon, tmp_path, "resize", vm_id, "--vcpu", "2", "--memory", "1G", "--disk", "3G"))
    config = info(daemon, tmp_path, vm_id)["configuration"]
    assert (config["vcpu"], config["memory"], config["disk_size"]) == (2, 1024, 3)  # type: ignore[index]

    new_compose = tmp_path / "new.json"
    new_compose.write_text(json.dumps({"runner": "docker-compose", "name": "v2"}))
    out = ok(cli(daemon, tmp_path, "update-app-compose", vm_id, str(new_compose)))
    assert f"compose hash: {hashlib.sha256(new_compose.read_bytes()).hexdigest()}" in out
    user_config = tmp_path / "user.cfg"
    user_config.write_text("hello=1\n")
    ok(cli(daemon, tmp_path, "update-user-config", vm_id, str(user_config)))
    ok(cli(daemon, tmp_path, "update-ports", vm_id, "--port", "tcp:0.0.0.0:20091:91"))
    config = info(daemon, tmp_path, vm_id)["configuration"]
    assert config["compose_file"] == new_compose.read_text()  # type: ignore[index]
    assert config["user_config"] == "hello=1\n"  # type: ignore[index]
    assert [p["host_port"] for p in config["ports"]] == [20091]  # type: ignore[index]

    ok(cli(daemon, tmp_path, "update", vm_id, "--no-ports", "--vcpu", "1", "--swap", "64M"))
    config = info(daemon, tmp_path, vm_id)["configuration"]
    assert config["ports"] == [] and config["vcpu"] == 1  # type: ignore[index]
    assert json.loads(config["compose_file"])["swap_size"] == 64 * 2**20  # type: ignore[index]

    nothing = cli(daemon, tmp_path, "update", vm_id)
    assert nothing.returncode == 1 and "nothing to update" in nothing.stderr
    refused = cli(daemon, tmp_path, "resize", vm_id, "--disk", "1G")
    assert refused.returncode == 1 and "ResizeVm failed:" in refused.stderr
    ok(cli(daemon, tmp_path, "remove", vm_id))


def test_top_once_lsgpu_lsimage_version(daemon: DaemonProcess, tmp_path: Path) -> None:
    """top --once prints the table (or JSON); lsgpu, lsimage and version answer, with --json."""
    vm_id = deploy(daemon, tmp_path, "topvm", "--stopped")
    table = ok(cli(daemon, tmp_path, "top", "--once"))
    assert "VM ID" in table and "Uptime" in table and vm_id[:12] in table and "stopped" in table
    assert vm_id in [vm["id"] for vm in json.loads(ok(cli(daemon, tmp_path, "top", "--once",
                                                             "--json")))]
    gpus = json.loads(ok(cli(daemon, tmp_path, "lsgpu", "--json")))
    assert gpus["gpus"] == []  # [cvm.gpu] is off here
    allowed = "yes" if gpus["allow_attach_all"] else "no"
    assert f"attach all allowed: {allowed}" in ok(cli(daemon, tmp_path, "lsgpu"))
    assert IDLE_IMAGE in [i["name"] for i in json.loads(ok(cli(daemon, tmp_path, "lsimage",
                                                                 "--json")))]
    assert json.loads(ok(cli(daemon, tmp_path, "version", "--json")))["version"] == "0.1.0"
    ok(cli(daemon, tmp_path, "remove", vm_id))


def test_unix_socket_url_and_images(daemon: DaemonProcess, tmp_path: Path) -> None:
    """unix:/path URLs reach the daemon; a missing socket is a one-line error."""
    url = f"unix:{daemon.unix[0]}"
    assert IDLE_IMAGE in ok(cli(daemon, tmp_path, "lsimage", url=url))
    assert ok(cli(daemon, tmp_path, "version", url=url)).startswith("0.1.0 (")
    missing = cli(daemon, tmp_path, "version", url="unix:/nonexistent/vmm.sock")
    assert missing.returncode == 1 and "cannot reach the VMM" in missing.stderr


def test_settings_from_the_config_file_and_the_environment(daemon: DaemonProcess,
                                                         tmp_path: Path) -> None:
    """~/.dstack-vmm/config.json gives URL and token; the environment wins, and flags win over both."""
    (tmp_path / ".dstack-vmm").mkdir()
    (tmp_path / ".dstack-vmm" / "config.json").write_text(
        json.dumps({"url": daemon.base_url, "auth_token": TOKEN}))
    assert ok(run_cli("version", home=tmp_path)).startswith("0.1.0")
    wrong = run_cli("version", home=tmp_path, env={"DSTACK_VMM_TOKEN": "wrong"})
    assert wrong.returncode == 1 and "unauthorized" in wrong.stderr.lower()
    assert ok(run_cli("--token", TOKEN, "version", home=tmp_path,
                      env={"DSTACK_VMM_TOKEN": "wrong"})).startswith("0.1.0")
    elsewhere = run_cli("version", home=tmp_path, env={"DSTACK_VMM_URL": "unix:/nonexistent"})
    assert elsewhere.returncode == 1 and "unix:/nonexistent" in elsewhere.stderr
    basic = run_cli("--url", daemon.base_url, "version", home=tmp_path / "nohome",
                    env={"DSTACK_VMM_AUTH_USER": "admin", "DSTACK_VMM_AUTH_PASSWORD": TOKEN})
    assert ok(basic).startswith("0.1.0")


def test_errors_are_one_line_and_exit_1(daemon: DaemonProcess, tmp_path: Path) -> None:
    """A refused call prints the daemon's message and exits 1; bad auth is refused."""
    unknown = cli(daemon, tmp_path, "info", "no-such-vm")
    assert unknown.returncode == 1 and "VM not found: no-such-vm" in unknown.stderr
    bad = cli(daemon, tmp_path, "start", "no-such-vm")
    assert bad.returncode == 1 and "StartVm failed: VM not found" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    denied = cli(daemon, tmp_path, "lsvm", token="wrong")
    assert denied.returncode == 1 and "unauthorized" in denied.stderr.lower()
    bad_name = cli(daemon, tmp_path, "deploy", "--name", "bad/name", "--image", IDLE_IMAGE,
                   "--compose", str(tmp_path / "absent.json"))
    assert bad_name.returncode == 1 and "absent.json" in bad_name.stderr


def test_compose_writes_the_document_and_prints_its_hash(tmp_path: Path) -> None:
    """compose maps every flag into app-compose.json and prints sha256 of the written bytes."""
    (tmp_path / "docker-compose.yaml").write_text("services:\n  web: {image: nginx}\n")
    (tmp_path / "pre.sh").write_text("echo hi\n")
    (tmp_path / "app.env").write_text("B=2\nA=1\nAPP_LAUNCH_TOKEN=secret\n")
    out = tmp_path / "app-compose.json"
    printed = ok(run_cli("compose", "--name", "web", "--docker-compose",
                         str(tmp_path / "docker-compose.yaml"), "--output", str(out), "--kms",
                         "--gateway", "--public-logs", "--public-sysinfo", "--prelaunch-script",
                         str(tmp_path / "pre.sh"), "--env-file", str(tmp_path / "app.env"),
                         "--no-instance-id", "--secure-time", "--swap", "1G",
                         "--event-log-version", "2", "--key-provider-id", "abcd", home=tmp_path))
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    assert f"compose hash: {digest}" in printed and f"app id: {digest[:40]}" in printed
    doc = json.loads(out.read_text())
    assert doc["manifest_version"] == 2 and doc["runner"] == "docker-compose"
    assert doc["docker_compose_file"] == "services:\n  web: {image: nginx}\n"
    assert doc["kms_enabled"] is True and doc["key_provider"] == "kms"
    assert doc["gateway_enabled"] is True and doc["public_logs"] is True
    assert doc["allowed_envs"] == ["A", "APP_LAUNCH_TOKEN", "B"]
    assert doc["launch_token_hash"] == hashlib.sha256(b"secret").hexdigest()
    assert doc["pre_launch_script"] == "echo hi\n" and doc["swap_size"] == 2**30
    assert doc["event_log_version"] == 2 and doc["no_instance_id"] is True
    assert doc["key_provider_id"] == "abcd" and doc["secure_time"] is True
    assert out.read_text().startswith('{\n    "manifest_version"')  # dstack's 4-space layout
    no_kms = run_cli("compose", "--name", "web", "--docker-compose",
                     str(tmp_path / "docker-compose.yaml"), "--output", str(out), "--env-file",
                     str(tmp_path / "app.env"), home=tmp_path)
    assert no_kms.returncode == 1 and "--env-file needs --kms" in no_kms.stderr


def test_kms_whitelist_list_add_remove(tmp_path: Path) -> None:
    """kms add stores a signer (without 0x) in ~/.dstack-vmm/kms-whitelist.json; list and remove."""
    assert "no trusted KMS signers" in ok(run_cli("kms", "list", home=tmp_path))
    ok(run_cli("kms", "add", f"0x{SIGNER.upper()}", home=tmp_path))
    stored = json.loads((tmp_path / ".dstack-vmm" / "kms-whitelist.json").read_text())
    assert stored == {"trusted_signers": [SIGNER]}
    assert ok(run_cli("kms", "list", home=tmp_path)) == f"0x{SIGNER}\n"
    assert json.loads(ok(run_cli("kms", "list", "--json", home=tmp_path))) == [SIGNER]
    bad = run_cli("kms", "add", "0x1234", home=tmp_path)
    assert bad.returncode == 1 and "33-byte compressed" in bad.stderr
    ok(run_cli("kms", "remove", SIGNER, home=tmp_path))
    assert json.loads(ok(run_cli("kms", "list", "--json", home=tmp_path))) == []
    gone = run_cli("kms", "remove", SIGNER, home=tmp_path)
    assert gone.returncode == 1 and "is not in" in gone.stderr


def test_get_meta_names_the_config_file(daemon: DaemonProcess) -> None:
    """GetMeta's config_file (extension field 110) is the absolute path of the daemon's -c file."""
    with daemon.client(headers={"Authorization": f"Bearer {TOKEN}"}) as client:
        meta = client.post("/prpc/GetMeta?json", json={}).json()
    assert meta["config_file"] == str((daemon.workdir / "vmm.toml").resolve())


def test_deploy_and_update_flags_reach_the_vm(daemon: DaemonProcess, tmp_path: Path) -> None:
    """deploy/update flags (--net, --hugepages, --pin-numa, --tee, URLs, --app-id) land in the VM."""
    vm_id = deploy(daemon, tmp_path, "flags", "--stopped", "--net", "user", "--hugepages",
                   "--pin-numa", "--no-tee", "--gateway-url", "https://gw.example:443",
                   "--app-id", "0x" + "AB" * 20)
    shown = info(daemon, tmp_path, vm_id)
    config = shown["configuration"]
    assert shown["app_id"] == "ab" * 20
    assert config["networking"] == {"mode": "user", "bridge_name": "", "mac": ""}  # type: ignore[index]
    assert (config["hugepages"], config["pin_numa"], config["no_tee"]) == (  # type: ignore[index]
        True, True, True)
    assert config["gateway_urls"] == ["https://gw.example:443"]  # type: ignore[index]

    ok(cli(daemon, tmp_path, "update", vm_id, "--tee", "--kms-url", "https://kms.example",
           "--gateway-url", "https://gw2.example"))
    config = info(daemon, tmp_path, vm_id)["configuration"]
    assert config["no_tee"] is False  # type: ignore[index]
    assert config["kms_urls"] == ["https://kms.example"]  # type: ignore[index]
    assert config["gateway_urls"] == ["https://gw2.example"]  # type: ignore[index]

    gpu = cli(daemon, tmp_path, "update", vm_id, "--gpu", "18:00.0")
    assert gpu.returncode == 1 and "GPU passthrough is not enabled" in gpu.stderr
    ok(cli(daemon, tmp_path, "remove", vm_id))
