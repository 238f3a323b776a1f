"""One real boot of the development image through LibvirtBackend and a private libvirtd."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
import pytest

from guest_agent import BOOT_MARKER
from tests.backend.libvirt.cases import real_spec
from tests.guest_agent.agent_harness import FrameStream, GuestApiClient, HostApiPeer, connect_unix
from tests.support.guest_image import ensure_guest_image
from tests.support.libvirtd import Libvirtd
from tests.support.short_dirs import short_dir
from tests.support.vm_ops import free_port
from vmm.backend.base import LaunchSpec
from vmm.backend.disk import qemu_img_create_argv
from vmm.backend.libvirt.backend import LibvirtBackend
from vmm.core.config import Config
from vmm.model.images import load_image
from vmm.model.manifest import PortMap
from vmm.model.runtime import Runtime

pytestmark = [pytest.mark.anyio, pytest.mark.qemu]

VM_ID = "boot-vm"
BOOT_TIMEOUT = 180.0
MEMORY_MB = 512


def prepared_spec(workdir: Path, qemu: str, host_port: int) -> LaunchSpec:
    image_dir = ensure_guest_image()
    image = load_image(image_dir.parent, image_dir.name)
    forward = PortMap(protocol="tcp", host_port=host_port, vm_port=8080, address="127.0.0.1")
    spec = real_spec(workdir, image, VM_ID, qemu, vcpu=2, memory=MEMORY_MB, port_map=(forward,))
    shared = workdir / "shared"
    (shared / "app-compose.json").write_text(json.dumps({"manifest_version": 2, "name": "lv"}))
    subprocess.run(qemu_img_create_argv(spec), check=True, capture_output=True, timeout=60)
    return spec


def boot_markers(serial_log: Path) -> int:
    try:
        text = serial_log.read_text(errors="replace")
    except FileNotFoundError:
        return 0
    return [line.strip() for line in text.splitlines()].count(BOOT_MARKER)


def http_json(url: str, timeout: float) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                body: dict[str, object] = json.loads(response.read())
                return body
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def guest_sys_info(workdir: Path) -> dict[str, object]:
    """SysInfo from the guest agent over the agent socket, with the host-API port served."""
    peer = HostApiPeer(lambda: connect_unix(workdir / "host-api.sock", 1.0))
    with peer:
        stream = FrameStream(connect_unix(workdir / "agent.sock", 10))
        try:
            status, info = GuestApiClient(stream).call("SysInfo", timeout=60)
        finally:
            stream.close()
    assert status == 200, info
    result: dict[str, object] = info
    return result


async def wait_until(what: str, check: Callable[[], Awaitable[bool]], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():
            return
        await anyio.sleep(0.1)
    raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")


async def test_dev_image_boots_is_adopted_powers_off_and_is_forgotten(libvirtd: Libvirtd) -> None:
    """launch → boot marker → adopted by a new backend → HTTP and agent → ACPI off → kill → forget."""
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None or shutil.which("qemu-img") is None:
        pytest.skip("qemu-system-x86_64 or qemu-img is not installed")
    with short_dir("lvb") as workdir:
        host_port = free_port()
        spec = await anyio.to_thread.run_sync(prepared_spec, workdir, qemu, host_port)
        serial_log = workdir / "serial.log"
        backend = await LibvirtBackend(Config(), libvirtd.uri).open()
        try:
            started = time.monotonic()
            launched = await backend.launch(spec)
            assert launched.running and launched.pid is not None

            async def booted() -> bool:
                runtime = await backend.runtime(VM_ID)
                assert runtime is not None and runtime.running, runtime
                return boot_markers(serial_log) == 1

            await wait_until("the boot marker", booted, BOOT_TIMEOUT)
            print(f"libvirt launch -> boot marker {time.monotonic() - started:.2f} s")

            adopter = await LibvirtBackend(Config(), libvirtd.uri).open()
            try:
                assert await adopter.runtime(VM_ID) == launched
            finally:
                await adopter.close()

            body = await anyio.to_thread.run_sync(http_json, f"http://127.0.0.1:{host_port}/", 60)
            assert body["service"] == "vmm-guest"
            info = await anyio.to_thread.run_sync(guest_sys_info, workdir)
            assert info["num_cpus"] == 2
            total = MEMORY_MB * 1024 * 1024
            assert 0.85 * total < int(str(info["total_memory"])) <= total

            await backend.request_power_off(VM_ID)

            async def exited() -> bool:
                return await backend.runtime(VM_ID) == Runtime(status="exited", exit_code=0, cid=1000)

            await wait_until("the guest to power off", exited, 60)

            again = await backend.launch(spec)
            assert again.running and again.pid not in (None, launched.pid)
            await backend.kill(VM_ID)
            assert await backend.runtime(VM_ID) == Runtime(status="stopped", cid=1000)
            await backend.forget(VM_ID)
            assert await backend.runtime(VM_ID) is None
            assert VM_ID not in await backend.runtimes()
        finally:
            try:
                await backend.kill(VM_ID)
                await backend.forget(VM_ID)
            finally:
                await backend.close()
