"""vmm-cli's encrypted env against the real test KMS peer: signer checked, env sealed to its key."""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cli_client.harness import TOKEN, cli_daemon, run_cli
from tests.support.daemon_proc import DaemonProcess
from tests.support.idle_image import IDLE_IMAGE
from tests.support.kms_peer import OTHER_SIGNING_KEY, SIGNER, KmsPeer, app_private_key, kms_peer
from vmm.cli_client.envcrypt import decrypt_env

ENV = {"API_KEY": "s3cret", "GREETING": "hello world"}
KMS_COMPOSE = {"manifest_version": 2, "name": "sealed", "runner": "docker-compose",
               "docker_compose_file": "services: {}\n", "kms_enabled": True}


@pytest.fixture(scope="module")
def kms() -> Iterator[KmsPeer]:
    with kms_peer() as peer:
        yield peer


@pytest.fixture(scope="module")
def wrong_kms() -> Iterator[KmsPeer]:
    """A KMS answering in the right format, signed by a key nobody trusts."""
    with kms_peer(signing_key=OTHER_SIGNING_KEY) as peer:
        yield peer


@pytest.fixture(scope="module")
def daemon(kms: KmsPeer) -> Iterator[DaemonProcess]:
    with cli_daemon(kms_url=kms.url) as proc:
        yield proc


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """A HOME whose whitelist trusts the test KMS's signer, with an env file and a compose."""
    (tmp_path / ".dstack-vmm").mkdir()
    (tmp_path / ".dstack-vmm" / "kms-whitelist.json").write_text(
        json.dumps({"trusted_signers": [f"0x{SIGNER}"]}))
    (tmp_path / "app.env").write_text("".join(f'{k}="{v}"\n' for k, v in ENV.items()))
    (tmp_path / "compose.json").write_text(json.dumps(KMS_COMPOSE))
    return tmp_path


def cli(daemon: DaemonProcess, home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli("--url", daemon.base_url, "--token", TOKEN, *args, home=home)


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"rc={result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def deploy(daemon: DaemonProcess, home: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return cli(daemon, home, "deploy", "--name", "sealed", "--image", IDLE_IMAGE, "--compose",
               str(home / "compose.json"), "--memory", "64M", "--disk", "1G", "--stopped",
               "--env-file", str(home / "app.env"), *extra)


def vm_files(daemon: DaemonProcess, vm_id: str) -> Path:
    return daemon.workdir / "state" / "vm" / vm_id / "shared"


def opened_env(daemon: DaemonProcess, vm_id: str, app_id: str) -> dict[str, str]:
    """What the guest would decrypt, with the KMS's private key for the app."""
    blob = (vm_files(daemon, vm_id) / ".encrypted-env").read_bytes()
    return decrypt_env(blob, app_private_key(bytes.fromhex(app_id)))


def vm_count(daemon: DaemonProcess, home: Path) -> int:
    return len(json.loads(ok(cli(daemon, home, "lsvm", "--json"))))


def test_deploy_seals_the_env_to_the_daemons_kms(daemon: DaemonProcess, kms: KmsPeer,
                                                 home: Path) -> None:
    """deploy --env-file: key from the VMM's KMS, signer whitelisted, env opens with the KMS key."""
    vm_id = ok(deploy(daemon, home)).strip()
    compose_text = (vm_files(daemon, vm_id) / "app-compose.json").read_text()
    app_id = hashlib.sha256(compose_text.encode()).hexdigest()[:40]
    assert json.loads(compose_text)["allowed_envs"] == sorted(ENV)
    assert opened_env(daemon, vm_id, app_id) == ENV
    assert (kms.requests[-1][0], json.loads(kms.requests[-1][1])) == (
        "/prpc/GetAppEnvEncryptPubKey?json", {"app_id": app_id})
    ok(cli(daemon, home, "remove", vm_id))


def test_deploy_asks_the_kms_url_directly_with_the_given_app_id(
        daemon: DaemonProcess, kms: KmsPeer, home: Path) -> None:
    """--kms-url is asked for the key itself, for the --app-id given."""
    app_id = "ab" * 20
    before = len(kms.requests)
    vm_id = ok(deploy(daemon, home, "--kms-url", kms.url, "--app-id", f"0x{app_id}")).strip()
    assert opened_env(daemon, vm_id, app_id) == ENV
    assert json.loads(kms.requests[before][1]) == {"app_id": app_id}
    ok(cli(daemon, home, "remove", vm_id))


def test_a_kms_key_signed_by_an_untrusted_signer_is_refused(
        daemon: DaemonProcess, wrong_kms: KmsPeer, home: Path) -> None:
    """A KMS whose signer is not whitelisted gets no secrets: exit 1, signer named, no VM."""
    before = vm_count(daemon, home)
    refused = deploy(daemon, home, "--kms-url", wrong_kms.url)
    other = OTHER_SIGNING_KEY.public_key.format(compressed=True).hex()
    assert refused.returncode == 1
    assert f"its signer 0x{other} is not trusted" in refused.stderr
    assert vm_count(daemon, home) == before
    # ...and an empty whitelist trusts nobody, the right KMS included.
    (home / ".dstack-vmm" / "kms-whitelist.json").unlink()
    assert "is not trusted" in deploy(daemon, home).stderr
    # --trust-signer vouches for a signer for one call.
    vm_id = ok(deploy(daemon, home, "--kms-url", wrong_kms.url, "--trust-signer", other)).strip()
    ok(cli(daemon, home, "remove", vm_id))


def test_env_needs_a_kms_backed_compose(daemon: DaemonProcess, home: Path) -> None:
    """--env-file on a compose without kms_enabled is refused before anything is created."""
    (home / "compose.json").write_text(json.dumps({**KMS_COMPOSE, "kms_enabled": False}))
    refused = deploy(daemon, home)
    assert refused.returncode == 1 and "needs a KMS-backed app" in refused.stderr
    (home / "app.env").write_text("not an env line\n")
    (home / "compose.json").write_text(json.dumps(KMS_COMPOSE))
    broken = deploy(daemon, home)
    assert broken.returncode == 1 and "app.env:1: expected KEY=VALUE" in broken.stderr


def test_update_with_compose_and_env_keeps_both(daemon: DaemonProcess, kms: KmsPeer,
                                                home: Path) -> None:
    """update --compose --env-file: the new compose AND the new env land (dstack bug #707)."""
    vm_id = ok(deploy(daemon, home)).strip()
    app_id = json.loads(ok(cli(daemon, home, "info", vm_id, "--json")))["app_id"]
    new_compose = home / "v2.json"
    new_compose.write_text(json.dumps({**KMS_COMPOSE, "name": "sealed-v2"}))
    (home / "v2.env").write_text("ONLY=new\n")
    out = ok(cli(daemon, home, "update", vm_id, "--compose", str(new_compose),
                 "--env-file", str(home / "v2.env")))
    stored = (vm_files(daemon, vm_id) / "app-compose.json").read_text()
    assert json.loads(stored)["name"] == "sealed-v2"
    assert json.loads(stored)["allowed_envs"] == ["ONLY"]
    assert f"compose hash: {hashlib.sha256(stored.encode()).hexdigest()}" in out
    assert opened_env(daemon, vm_id, app_id) == {"ONLY": "new"}  # sealed for the VM's app id

    (home / "v3.env").write_text("APP_LAUNCH_TOKEN=tok\n")
    # update-env's --kms-url only says where the key comes from: the VM's KMS URLs stay.
    ok(cli(daemon, home, "update-env", vm_id, "--env-file", str(home / "v3.env"), "--kms-url",
           kms.url))
    assert json.loads(ok(cli(daemon, home, "info", vm_id, "--json")))["configuration"][
        "kms_urls"] == []
    stored_doc = json.loads((vm_files(daemon, vm_id) / "app-compose.json").read_text())
    assert stored_doc["name"] == "sealed-v2" and stored_doc["allowed_envs"] == ["APP_LAUNCH_TOKEN"]
    assert stored_doc["launch_token_hash"] == hashlib.sha256(b"tok").hexdigest()
    assert opened_env(daemon, vm_id, app_id) == {"APP_LAUNCH_TOKEN": "tok"}
    ok(cli(daemon, home, "remove", vm_id))
