"""The RPCs that need no VM, called on the real daemon as the API spec shows them."""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import threading
import time
from pathlib import Path

import pytest
from google.protobuf.empty_pb2 import Empty

from tests.conftest import make_image
from tests.support.daemon_proc import DaemonProcess, start_daemon
from tests.support.in_process import in_process_config, state_dir
from tests.support.kms_peer import KmsPeer, expected_answer
from vmm import __version__
from vmm.api.servicer import VmmServicer
from vmm.daemon import Daemon
from vmm.model import images
from vmm.prpc.bridge import CallContext
from vmm.rpc import prpc_pb2
from vmm.rpc import vmm_rpc_pb2 as pb


def _curl(daemon: DaemonProcess, *args: str) -> tuple[int, str]:
    """Run curl against the daemon's TCP listener; return (status, body)."""
    out = subprocess.run(
        ["curl", "-sS", "-w", "\n%{http_code}", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    body, _, status = out.rpartition("\n")
    return int(status), body


def test_version_example(daemon: DaemonProcess) -> None:
    """POST /prpc/Version with {} returns the version and a git revision."""
    status, body = _curl(
        daemon, "-X", "POST", f"{daemon.base_url}/prpc/Version",
        "-H", "Content-Type: application/json", "-d", "{}",
    )
    assert status == 200
    data = json.loads(body)
    assert data["version"] == __version__
    assert data["rev"].startswith("git:") or data["rev"] == "unknown"


def test_get_meta_example(daemon: DaemonProcess) -> None:
    """GetMeta reports KMS, gateway, resources and the host capabilities the daemon chose."""
    status, body = _curl(
        daemon, "-X", "POST", f"{daemon.base_url}/prpc/GetMeta",
        "-H", "Content-Type: application/json", "-d", "{}",
    )
    assert status == 200
    data = json.loads(body)
    assert data["kms"] == {"url": "http://127.0.0.1:8081", "urls": ["http://127.0.0.1:8081"]}
    assert data["gateway"]["base_domain"] == "localhost"
    assert data["gateway"]["port"] == 8082
    assert data["gateway"]["agent_port"] == 8090
    assert data["resources"]["max_cvm_number"] == 1000
    assert data["resources"]["max_allocable_vcpu"] == 20
    assert data["resources"]["max_allocable_memory_in_mb"] == 100000
    assert data["host"]["accelerator"] == "tcg"
    assert data["host"]["tee_platform"] == "none"
    assert data["host"]["guest_channel"] in ("vsock", "serial")
    assert data["networking"]["default_mode"] == "user"


def test_list_images_skips_broken_images(daemon: DaemonProcess) -> None:
    """ListImages lists loadable images and skips broken ones, logging why."""
    status, body = _curl(
        daemon, "-X", "POST", f"{daemon.base_url}/prpc/ListImages",
        "-H", "Content-Type: application/json", "-d", "{}",
    )
    assert status == 200
    images = {image["name"]: image for image in json.loads(body)["images"]}
    assert set(images) == {"dstack-0.5.3", "dstack-dev-0.5.4"}
    assert images["dstack-0.5.3"]["version"] == "0.5.3"
    assert images["dstack-0.5.3"]["is_dev"] is False
    assert json.loads(images["dstack-0.5.3"]["description"])["rootfs"] == "rootfs.img.verity"
    assert images["dstack-dev-0.5.4"]["version"] == "0.5.4"  # from the directory name
    assert images["dstack-dev-0.5.4"]["is_dev"] is True
    log = daemon.log()
    for name in ("broken-json", "old-0.4.0", "escapes", "missing-kernel"):
        assert f"skipping image '{name}'" in log


def test_list_images_reads_the_image_directory_off_the_event_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """ListImages reads every image's metadata in a worker thread, not on the loop's thread."""
    readers: list[int] = []
    real = images.list_images

    def recording(images_dir: Path) -> list[images.Image]:
        readers.append(threading.get_ident())
        return real(images_dir)

    monkeypatch.setattr(images, "list_images", recording)
    with state_dir("vmmli") as state:
        servicer = VmmServicer(Daemon(in_process_config(state)))

        async def scenario() -> tuple[int, pb.ImageListResponse]:
            ctx = CallContext(request_id="r", client="test", headers={})
            return threading.get_ident(), await servicer.ListImages(Empty(), ctx)

        loop_thread, reply = asyncio.run(scenario())
    assert {image.name for image in reply.images} == {"dstack-0.5.3", "dstack-dev-0.5.4"}
    assert readers and loop_thread not in readers


def test_get_compose_hash_is_sha256_of_the_exact_bytes(daemon: DaemonProcess) -> None:
    """GetComposeHash hashes the compose string byte for byte, without normalising it."""
    compose = '{"docker_compose_file":"...",  "runner": "docker-compose"}'
    with daemon.client() as client:
        response = client.post(
            "/prpc/GetComposeHash",
            json={"name": "test", "compose_file": compose, "image": "", "vcpu": 0,
                  "memory": 0, "disk_size": 0},
        )
    assert response.status_code == 200
    assert response.json() == {"hash": hashlib.sha256(compose.encode()).hexdigest()}


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"name": "bad/name", "compose_file": "{}"}, "invalid field `name`"),
        ({"name": "", "compose_file": "{}"}, "invalid field `name`: is required"),
        ({"name": "ok", "compose_file": "not json"}, "invalid field `compose_file`"),
        ({"name": "ok", "compose_file": "[1]"}, "must be a JSON object"),
        ({"name": "ok", "compose_file": '{"gateway_enabled": "yes"}'},
         "compose_file.gateway_enabled"),
        ({"name": "ok", "compose_file": '{"key_provider": "magic"}'},
         "compose_file.key_provider"),
        ({"name": "ok", "compose_file": "[" * 3000 + "]" * 3000},
         "invalid field `compose_file`: is nested too deeply"),
        ({"name": "ok", "compose_file": '{"x": ' + "[" * 3000 + "]" * 3000 + "}"},
         "invalid field `compose_file`: is nested too deeply"),
        ({"name": "ok", "compose_file": '{"manifest_version": ' + "9" * 5000 + "}"},
         "invalid field `compose_file`: has an integer with more than"),
    ],
)
def test_get_compose_hash_validates(
    daemon: DaemonProcess, payload: dict[str, str], message: str
) -> None:
    """GetComposeHash refuses a bad name or compose with 400 naming the field."""
    with daemon.client() as client:
        response = client.post("/prpc/GetComposeHash?json", json=payload)
    assert response.status_code == 400
    assert message in response.json()["error"]


def test_app_env_encrypt_pub_key_proxies_to_the_kms(daemon: DaemonProcess, kms: KmsPeer) -> None:
    """GetAppEnvEncryptPubKey decodes the hex app id, asks the KMS, and returns its 4 fields."""
    app_id = bytes.fromhex("abcdef1234567890abcdef1234567890abcdef12")
    before = len(kms.requests)
    status, body = _curl(
        daemon, "-X", "POST", f"{daemon.base_url}/prpc/GetAppEnvEncryptPubKey",
        "-H", "Content-Type: application/json", "-d", json.dumps({"app_id": "0x" + app_id.hex()}),
    )
    assert status == 200
    assert json.loads(body) == expected_answer(app_id)
    path, sent = kms.requests[before]
    assert path == "/prpc/GetAppEnvEncryptPubKey?json"
    assert json.loads(sent) == {"app_id": app_id.hex()}


def test_app_env_encrypt_pub_key_errors(daemon: DaemonProcess, kms: KmsPeer) -> None:
    """A missing app id is a 400; a failing KMS is a 503 that says which KMS and why."""
    with daemon.client() as client:
        response = client.post("/prpc/GetAppEnvEncryptPubKey?json", json={})
        assert response.status_code == 400
        assert "app_id" in response.json()["error"]
        kms.fail_with = 500
        try:
            response = client.post("/prpc/GetAppEnvEncryptPubKey?json", json={"app_id": "01"})
        finally:
            kms.fail_with = None
    assert response.status_code == 503
    assert "kms is sealed" in response.json()["error"]
    assert kms.url in response.json()["error"]


@pytest.mark.parametrize(
    ("lease", "field"),
    [
        ({"mac": "02:ab:cd:ef:01", "ip": "10.0.0.1"}, "mac"),
        ({"mac": "zz:ab:cd:ef:01:23", "ip": "10.0.0.1"}, "mac"),
        ({"mac": "02:ab:cd:ef:01:23", "ip": "10.0.0.256"}, "ip"),
        ({"mac": "02:ab:cd:ef:01:23", "ip": ""}, "ip"),
    ],
)
def test_report_dhcp_lease_validates(
    daemon: DaemonProcess, lease: dict[str, str], field: str
) -> None:
    """ReportDhcpLease refuses a malformed MAC or IPv4 address naming the field."""
    with daemon.client() as client:
        response = client.post("/prpc/ReportDhcpLease", json=lease)
    assert response.status_code == 400
    assert f"invalid field `{field}`" in response.json()["error"]


def test_registry_rpcs_without_a_registry(daemon: DaemonProcess) -> None:
    """With no image.registry, the registry list is empty and a pull says why it cannot."""
    with daemon.client() as client:
        listed = client.post("/prpc/ListRegistryImages?json", json={})
        pulled = client.post("/prpc/PullRegistryImage?json", json={"tag": "0.5.3"})
    assert listed.status_code == 200
    assert listed.json() == {"images": []}
    assert pulled.status_code == 409
    assert "no image registry is configured" in pulled.json()["error"]


def test_delete_image(daemon: DaemonProcess) -> None:
    """DeleteImage removes an unused image, refuses one in use or a bad name, 404s a missing one."""
    images = daemon.workdir / "state" / "images"
    make_image(images, "scratch-0.5.0", {"kernel": "k", "initrd": "i", "version": "0.5.0"})
    compose = '{"runner": "docker-compose"}'
    with daemon.client() as client:
        vm_id = client.post("/prpc/CreateVm?json", json={
            "name": "user", "image": "scratch-0.5.0", "compose_file": compose, "vcpu": 1,
            "memory": 256, "disk_size": 1, "stopped": True}).json()["id"]
        in_use = client.post("/prpc/DeleteImage?json", json={"id": "scratch-0.5.0"})
        assert in_use.status_code == 409
        assert "in use by VM 'user'" in in_use.json()["error"]
        assert client.post("/prpc/RemoveVm?json", json={"id": vm_id}).status_code == 200
        deadline = time.monotonic() + 30
        while client.post("/prpc/GetInfo?json", json={"id": vm_id}).json()["found"]:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert client.post("/prpc/DeleteImage?json", json={"id": "scratch-0.5.0"}).status_code == 200
        assert not (images / "scratch-0.5.0").exists()
        assert client.post("/prpc/DeleteImage?json", json={"id": "scratch-0.5.0"}).status_code == 404
        for bad in ("", "..", "a/b", "../state"):
            response = client.post("/prpc/DeleteImage?json", json={"id": bad})
            assert response.status_code == 400, bad
            assert "`id`" in response.json()["error"]
    assert (images / "dstack-0.5.3").is_dir()


def test_delete_image_never_leaves_the_images_dir(daemon: DaemonProcess) -> None:
    """DeleteImage refuses '.', '..', 'a/../b' and an outward symlink: nothing outside is touched."""
    images = daemon.workdir / "state" / "images"
    sibling = daemon.workdir / "state" / "sibling"
    make_image(sibling, "victim-0.5.0", {"kernel": "k", "initrd": "i", "version": "0.5.0"})
    (images / "planted").symlink_to(sibling / "victim-0.5.0", target_is_directory=True)
    before = sorted(p.name for p in images.iterdir())
    with daemon.client() as client:
        for bad in (".", "..", "a/../b", "./dstack-0.5.3", "planted", "dstack-0.5.3\n"):
            response = client.post("/prpc/DeleteImage?json", json={"id": bad})
            assert response.status_code == 400, (bad, response.text)
            assert "invalid field `id`" in response.json()["error"], bad
            response = client.post("/prpc/DeleteImage", content=pb.Id(id=bad).SerializeToString(),
                                   headers={"Content-Type": "application/octet-stream"})
            assert response.status_code == 400, bad
            assert "`id`" in prpc_pb2.PrpcError.FromString(response.content).message
    assert sorted(p.name for p in images.iterdir()) == before
    assert (sibling / "victim-0.5.0" / "metadata.json").is_file()
    (images / "planted").unlink()


def test_delete_image_of_an_inward_symlink_removes_only_the_link(daemon: DaemonProcess) -> None:
    """An image that is a symlink to another image in the dir is deleted as a link, not a tree."""
    images = daemon.workdir / "state" / "images"
    make_image(images, "target-0.5.0", {"kernel": "k", "initrd": "i", "version": "0.5.0"})
    (images / "alias-0.5.0").symlink_to("target-0.5.0", target_is_directory=True)
    with daemon.client() as client:
        response = client.post("/prpc/DeleteImage?json", json={"id": "alias-0.5.0"})
    assert response.status_code == 200, response.text
    assert not (images / "alias-0.5.0").is_symlink()
    assert (images / "target-0.5.0" / "metadata.json").is_file()


def test_list_gpus_reads_the_hosts_pci_devices(short_tmp: Path) -> None:
    """ListGpus lists this host's real PCI devices that match cvm.gpu.listing; disabled is []."""
    sysfs = Path("/sys/bus/pci/devices")
    device = next(p for p in sorted(sysfs.iterdir()) if p.name.startswith("0000:"))
    vendor = (device / "vendor").read_text().strip().removeprefix("0x")
    product = (device / "device").read_text().strip().removeprefix("0x")
    workdir = short_tmp / "gpu"
    proc = start_daemon(workdir, extra_config=(
        f'[cvm.gpu]\nenabled = true\nallow_attach_all = false\nlisting = ["{vendor}:{product}"]\n'
    ))
    try:
        with proc.client() as client:
            answer = client.post("/prpc/ListGpus?json", json={}).json()
    finally:
        proc.destroy()
    assert answer["allow_attach_all"] is False
    slot = device.name.removeprefix("0000:")
    assert [g["slot"] for g in answer["gpus"]] == [slot]
    assert answer["gpus"][0]["product_id"] == f"{vendor}:{product}"


def test_list_gpus_disabled_is_empty(daemon: DaemonProcess) -> None:
    """With cvm.gpu.enabled = false (the default) ListGpus is an empty list."""
    with daemon.client() as client:
        assert client.post("/prpc/ListGpus?json", json={}).json() == {
            "gpus": [], "allow_attach_all": True}
