"""The registry RPCs and ``vmm-cli pull`` through the real daemon, against a real registry:
list, pull with progress, boot the pulled image, delete it; bad input and a dead registry."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from guest_agent import BOOT_MARKER
from tests.support.daemon_proc import DaemonProcess, checkout_env, start_daemon
from tests.support.guest_image import ensure_guest_image
from tests.support.registry import (
    Registry,
    dev_image_tarball,
    push_image,
    registry_server,
    small_image_files,
    tar_of,
)
from tests.support.short_dirs import short_dir
from tests.support.vm_ops import call, error_of, rpc, wait_for

BOOT_TIMEOUT = 180.0


@pytest.fixture(scope="module")
def registry() -> Iterator[Registry]:
    with short_dir("vmmrd") as workdir, registry_server(workdir) as server:
        yield server


def registry_config(registry: Registry, extra: str = "") -> str:
    assert registry.ca is not None
    return (f'[image]\nregistry = "{registry.ref}"\n'
            f'registry_ca_file = "{registry.ca.ca_file}"\n{extra}')


@pytest.fixture(scope="module")
def daemon(registry: Registry) -> Iterator[DaemonProcess]:
    with short_dir("vmmrdd") as workdir:
        stale = workdir / "state" / "images" / ".pull-interrupted"
        (stale / "dstack-interrupted").mkdir(parents=True)
        (stale / "dstack-interrupted" / "metadata.json").write_text("{}")
        proc = start_daemon(workdir, extra_config=registry_config(registry))
        try:
            yield proc
        finally:
            proc.destroy()


def tags(client: httpx.Client) -> dict[str, dict[str, Any]]:
    return {t["tag"]: t for t in rpc(client, "ListRegistryImages")["images"]}


def pull_and_wait(client: httpx.Client, tag: str, timeout: float = 60.0) -> dict[str, Any]:
    assert rpc(client, "PullRegistryImage", {"tag": tag}) is None
    return dict(wait_for(f"the pull of {tag} to end",
                         lambda: (t := tags(client).get(tag)) and not t["pulling"] and t,
                         timeout=timeout))


def test_stale_staging_is_removed_at_start(daemon: DaemonProcess) -> None:
    """A staging area left by a pull that a restart cut short is gone once the daemon runs."""
    images = daemon.workdir / "state" / "images"
    assert not (images / ".pull-interrupted").exists()
    assert ".pull-interrupted" in daemon.log()


def test_list_pull_and_delete(daemon: DaemonProcess, registry: Registry) -> None:
    """Tags are listed (digest-named ones dropped), a pull ends local with bytes done = total,
    ListImages shows dstack-<tag>, and DeleteImage removes it."""
    layer = tar_of(small_image_files())
    push_image(registry, "0.5.4", [layer])
    push_image(registry, "sha256-" + "a" * 64, [layer])
    with daemon.client() as client:
        listed = tags(client)
        assert listed["0.5.4"] == {"tag": "0.5.4", "local": False, "pulling": False, "error": "",
                                   "bytes_done": 0, "bytes_total": 0}
        assert not [t for t in listed if t.startswith("sha256-")]

        done = pull_and_wait(client, "0.5.4")
        assert done == {"tag": "0.5.4", "local": True, "pulling": False, "error": "",
                        "bytes_done": len(layer), "bytes_total": len(layer)}
        # The pull's progress is on the event bus too, ending with "done" at every byte.
        stream = client.get("/events", params={"last_event_id": "0", "follow": "false"})
        pulls = [json.loads(line.removeprefix("data:")) for line in stream.text.splitlines()
                 if line.startswith("data:") and '"vmm.image_pull"' in line]
        progress = [json.loads(event["body"]) for event in pulls]
        assert progress[-1] == {"tag": "0.5.4", "status": "done", "bytes_done": len(layer),
                                "bytes_total": len(layer), "error": ""}
        assert all(p["tag"] == "0.5.4" for p in progress)
        names = [i["name"] for i in rpc(client, "ListImages")["images"]]
        assert "dstack-0.5.4" in names
        again = call(client, "PullRegistryImage", {"tag": "0.5.4"})
        assert "'dstack-0.5.4' already exists" in error_of(again, 409)

        assert rpc(client, "DeleteImage", {"id": "dstack-0.5.4"}) is None
        assert tags(client)["0.5.4"]["local"] is False
        assert "dstack-0.5.4" not in [i["name"] for i in rpc(client, "ListImages")["images"]]
    assert sorted(p.name for p in (daemon.workdir / "state" / "images").iterdir()) == []


def test_failed_pull_is_listed_with_its_error(daemon: DaemonProcess) -> None:
    """A tag the registry does not have fails; the listing keeps the registry's reason."""
    with daemon.client() as client:
        failed = pull_and_wait(client, "no-such-tag")
    assert failed["local"] is False
    assert "manifest no-such-tag: registry" in failed["error"]
    assert "HTTP 404: MANIFEST_UNKNOWN" in failed["error"]
    assert list((daemon.workdir / "state" / "images").iterdir()) == []


@pytest.mark.parametrize("tag", ["../etc", "a/b", "", "x" * 58, "tag with space"])
def test_bad_tags_are_refused(daemon: DaemonProcess, tag: str) -> None:
    """A tag with path characters (or too long for dstack-<tag>) is a 400 naming `tag`."""
    with daemon.client() as client:
        assert "invalid field `tag`" in error_of(call(client, "PullRegistryImage", {"tag": tag}),
                                                 400)


def test_cli_pull_draws_progress_and_lists_tags(daemon: DaemonProcess,
                                                registry: Registry) -> None:
    """``vmm-cli pull`` prints a progress bar to 100% and the image name; ``lsimage --registry``
    lists the tag as local afterwards; a failing pull exits 1 with the reason."""
    push_image(registry, "cli", [tar_of({**small_image_files(), "pad": b"p" * (3 << 20)})])
    cli = [sys.executable, "-m", "vmm.client_cli", "--url", daemon.base_url]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*cli, *args], capture_output=True, text=True, timeout=120,
                              env=checkout_env(), check=False)

    pulled = run("pull", "cli", "--interval", "0.05")
    assert pulled.returncode == 0, pulled.stderr
    assert pulled.stdout == "dstack-cli\n"
    assert pulled.stderr.splitlines()[-1].startswith(f"[{'#' * 30}] 100% ")
    listing = run("lsimage", "--registry")
    assert any(line.split()[:2] == ["cli", "yes"] for line in listing.stdout.splitlines())
    failed = run("pull", "missing-tag", "--interval", "0.05")
    assert failed.returncode == 1
    assert "pull of missing-tag failed: manifest missing-tag" in failed.stderr


def test_daemon_killed_mid_pull_leaves_no_half_image(registry: Registry) -> None:
    """SIGKILL of the daemon while it pulls leaves a staging area at most; the next start
    deletes it, and no dstack-<tag> exists until a new pull completes."""
    push_image(registry, "killed", [tar_of({**small_image_files(),
                                            "big": os.urandom(128 << 20)})])
    with short_dir("vmmrkill") as workdir:
        images = workdir / "state" / "images"
        first = start_daemon(workdir, extra_config=registry_config(registry))
        try:
            with first.client() as client:
                rpc(client, "PullRegistryImage", {"tag": "killed"})
                wait_for("the staging area", (images / ".pull-killed").exists, interval=0.005)
            first.kill()
        finally:
            first.destroy()
        assert (images / ".pull-killed").is_dir()  # the kill did cut a pull short
        assert not (images / "dstack-killed").exists()
        second = start_daemon(workdir, extra_config=registry_config(registry))
        try:
            assert list(images.iterdir()) == []
            with second.client() as client:
                assert tags(client)["killed"]["local"] is False
                assert pull_and_wait(client, "killed")["local"] is True
        finally:
            second.destroy()


def test_registry_down_is_503_naming_it(registry: Registry) -> None:
    """With the registry gone, ListRegistryImages is a 503 naming the registry; a pull's
    failure is still listed once it is back."""
    with short_dir("vmmrdown") as workdir:
        ref = "127.0.0.1:1/guest/dstack"
        proc = start_daemon(workdir, extra_config=f'[image]\nregistry = "{ref}"\n')
        try:
            with proc.client() as client:
                answer = call(client, "ListRegistryImages")
                assert f"tags/list: registry {ref} unreachable" in error_of(answer, 503)
                assert answer.json()["code"] == "REGISTRY_ERROR"
        finally:
            proc.destroy()


def test_plain_http_for_a_remote_registry_is_refused() -> None:
    """registry_plain_http with a non-loopback registry stops the daemon at start, naming it."""
    with short_dir("vmmrcfg") as workdir:
        refused = r"`image\.registry_plain_http`: plain http is allowed only for a loopback"
        with pytest.raises(RuntimeError, match=refused):
            start_daemon(workdir, extra_config='[image]\nregistry = "10.0.0.1:5000/x"\n'
                                               "registry_plain_http = true\n")


@pytest.mark.qemu
def test_pulled_dev_image_boots(registry: Registry) -> None:
    """The development image pushed as a layer and pulled through the daemon boots a VM to the
    guest's boot marker, and DeleteImage removes it once the VM is gone."""
    image_dir = ensure_guest_image()
    with short_dir("vmmrboot") as workdir:
        tarball = dev_image_tarball(image_dir, workdir / "layer.tar")
        push_image(registry, "0.5.0-dev", [tarball])
        tarball.unlink()
        proc = start_daemon(workdir, extra_config=registry_config(
            registry, '[cvm]\naccel = "tcg"\n'))
        try:
            with proc.client() as client:
                done = pull_and_wait(client, "0.5.0-dev", timeout=300)
                assert done["error"] == "" and done["local"], done
                pulled = workdir / "state" / "images" / "dstack-0.5.0-dev"
                for name in ("vmlinux", "initramfs.cpio.gz", "metadata.json"):
                    assert _sha(pulled / name) == _sha(image_dir / name)
                vm_id = rpc(client, "CreateVm", {
                    "name": "pulled", "image": "dstack-0.5.0-dev", "vcpu": 1, "memory": 512,
                    "disk_size": 2, "compose_file": '{"manifest_version": 2, "name": "p", '
                    '"runner": "docker-compose", "docker_compose_file": "services: {}\\n"}'})["id"]
                wait_for("the boot marker", lambda: BOOT_MARKER in client.get(
                    "/logs", params={"id": vm_id, "lines": 400}).text, timeout=BOOT_TIMEOUT)
                in_use = call(client, "DeleteImage", {"id": "dstack-0.5.0-dev"})
                assert "in use by VM 'pulled'" in error_of(in_use, 409)
                rpc(client, "RemoveVm", {"id": vm_id})
                wait_for("the VM to go", lambda: not rpc(client, "GetInfo", {"id": vm_id})[
                    "found"], timeout=60)
                assert rpc(client, "DeleteImage", {"id": "dstack-0.5.0-dev"}) is None
                assert not pulled.exists()
        finally:
            proc.destroy()


def _sha(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fp:
        for chunk in iter(lambda: fp.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
