"""LibvirtBackend against a real private libvirtd, without booting a guest.

Domains are defined from the dev case and read back; the QEMUs that do run boot the idle image
(a kernel that halts at once) or fail to start, so nothing here boots Linux.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import libvirt  # type: ignore[import-untyped]
import pytest

from tests.backend.libvirt.cases import dev_case, make_manifest, real_spec, tcg_host
from tests.support.idle_image import IDLE_IMAGE, make_idle_image
from tests.support.libvirtd import Libvirtd
from tests.support.short_dirs import short_dir
from vmm.backend.base import LaunchSpec, VmBackend
from vmm.backend.disk import qemu_img_create_argv
from vmm.backend.libvirt.backend import LibvirtBackend, runtime_status
from vmm.backend.libvirt.domain import build_domain_xml, domain_name, domain_uuid
from vmm.core.config import Config
from vmm.core.exceptions import Conflict, Unavailable, Unsupported
from vmm.model.images import load_image
from vmm.model.runtime import Runtime

pytestmark = pytest.mark.anyio


def create_disk(spec: LaunchSpec) -> None:
    subprocess.run(qemu_img_create_argv(spec), check=True, capture_output=True, timeout=60)


def cmdline(pid: int) -> list[str]:
    """The process's argv, or [] once it is gone (a zombie's cmdline is empty too)."""
    try:
        data = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return data.decode().split("\0") if data else []


async def backend_for(libvirtd: Libvirtd, config: Config | None = None) -> LibvirtBackend:
    backend = await LibvirtBackend(config or Config(), libvirtd.uri, vhost_vsock=False).open()
    seam: VmBackend = backend  # mypy checks that it fits the seam the lifecycle layer sees
    assert seam.info.name == "libvirt"
    return backend


def test_runtime_status_follows_supervisor_meaning() -> None:
    """Guest power-off is exited(0), destroy is stopped, a failed start is error, running runs."""
    assert runtime_status(libvirt.VIR_DOMAIN_RUNNING, 1) == ("running", None, "")
    assert runtime_status(libvirt.VIR_DOMAIN_PAUSED, 0)[0] == "running"
    shutoff = libvirt.VIR_DOMAIN_SHUTOFF
    assert runtime_status(shutoff, libvirt.VIR_DOMAIN_SHUTOFF_SHUTDOWN) == ("exited", 0, "")
    assert runtime_status(shutoff, libvirt.VIR_DOMAIN_SHUTOFF_DESTROYED) == ("stopped", None, "")
    assert runtime_status(shutoff, libvirt.VIR_DOMAIN_SHUTOFF_UNKNOWN) == ("stopped", None, "")
    assert runtime_status(shutoff, libvirt.VIR_DOMAIN_SHUTOFF_CRASHED)[:2] == ("exited", None)
    assert runtime_status(shutoff, libvirt.VIR_DOMAIN_SHUTOFF_FAILED)[0] == "error"


async def test_backend_reads_defined_domains_and_forgets_them(
    libvirtd: Libvirtd, conn: libvirt.virConnect
) -> None:
    """A defined domain is reported stopped with its CID; forget undefines it; unknown is None."""
    spec, config = dev_case()
    conn.defineXML(build_domain_xml(spec, config))
    backend = await backend_for(libvirtd, config)
    try:
        assert await backend.runtime(spec.manifest.id) == Runtime(status="stopped", cid=1000)
        assert await backend.runtimes() == {spec.manifest.id: Runtime(status="stopped", cid=1000)}
        assert await backend.runtime("no-such-vm") is None
        await backend.kill(spec.manifest.id)  # not running: nothing to do, the record stays
        assert (await backend.runtime(spec.manifest.id)) is not None
        with pytest.raises(Unavailable, match="not running"):
            await backend.request_power_off(spec.manifest.id)
        await backend.forget(spec.manifest.id)
        assert await backend.runtime(spec.manifest.id) is None
        assert conn.listAllDomains(0) == []
        await backend.forget(spec.manifest.id)  # forgetting twice is harmless
    finally:
        await backend.close()


async def test_foreign_domains_are_never_adopted_or_touched(
    libvirtd: Libvirtd, conn: libvirt.virConnect
) -> None:
    """A domain with our prefix but without our metadata is not reported, forgotten or replaced."""
    spec, config = dev_case()
    xml = build_domain_xml(spec, config)
    start, end = xml.index("<metadata>"), xml.index("</metadata>") + len("</metadata>")
    conn.defineXML(xml[:start] + xml[end:])
    backend = await backend_for(libvirtd, config)
    try:
        assert await backend.runtimes() == {}
        assert await backend.runtime(spec.manifest.id) is None
        await backend.forget(spec.manifest.id)
        assert [d.name() for d in conn.listAllDomains(0)] == [domain_name(spec.manifest.id)]
        with pytest.raises(Conflict, match="not this daemon's VM"):
            await backend.launch(spec)
    finally:
        await backend.close()


async def test_backend_reconnects_after_libvirtd_restarts(libvirtd: Libvirtd) -> None:
    """While libvirtd is down calls raise Unavailable naming the URI; after it is back they work."""
    spec, config = dev_case()
    connection = libvirt.open(libvirtd.uri)
    connection.defineXML(build_domain_xml(spec, config))
    connection.close()
    backend = await backend_for(libvirtd, config)
    try:
        assert (await backend.runtime(spec.manifest.id)) is not None
        libvirtd.stop()
        try:
            with pytest.raises(Unavailable, match=r"libvirt.*libvirt-sock"):
                await backend.runtime(spec.manifest.id)
        finally:
            libvirtd.start()
        assert await backend.runtime(spec.manifest.id) == Runtime(status="stopped", cid=1000)
        await backend.forget(spec.manifest.id)
    finally:
        await backend.close()


async def test_unsupported_spec_is_refused_before_libvirt(libvirtd: Libvirtd) -> None:
    """A TDX VM raises Unsupported (409, UNSUPPORTED) naming TDX and the libvirt backend."""
    spec, config = dev_case()
    spec = replace(spec, host=replace(spec.host, accel="kvm", tee="tdx"))
    backend = await backend_for(libvirtd, config)
    try:
        with pytest.raises(Unsupported) as caught:
            await backend.launch(spec)
        assert caught.value.status_code == 409 and caught.value.code == "UNSUPPORTED"
        assert "TDX" in caught.value.message and "libvirt backend" in caught.value.message
        info = backend.info
        assert info.name == "libvirt" and info.version.startswith("libvirt 9.")
        assert "QEMU 7." in info.version
        assert any(u.startswith("TDX") for u in info.unsupported)
        assert any(u.startswith("vsock") for u in info.unsupported)  # built with vhost_vsock=False
    finally:
        await backend.close()


async def test_failed_start_is_a_conflict_and_an_error_runtime(
    libvirtd: Libvirtd, conn: libvirt.virConnect
) -> None:
    """QEMU failing to start (no kernel file) raises Conflict; the runtime is error with the cause."""
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        pytest.skip("qemu-system-x86_64 is not installed")
    with short_dir("lvf") as wd:
        (wd / "shared").mkdir()
        image_dir = wd / "image"
        spec, config = dev_case()
        spec = replace(
            spec, manifest=make_manifest(id="failing-vm"), workdir=wd,
            host=tcg_host(qemu_path=qemu),
            image=replace(spec.image, kernel=image_dir / "missing-kernel", rootfs=None),
        )  # fmt: skip
        create_disk(spec)
        backend = await backend_for(libvirtd, config)
        try:
            with pytest.raises(Conflict, match="could not start VM failing-vm"):
                await backend.launch(spec)
            runtime = await backend.runtime("failing-vm")
            assert runtime is not None and runtime.status == "error"
            assert "missing-kernel" in runtime.error
        finally:
            await backend.close()


async def test_idle_vm_launch_adopt_kill_forget(libvirtd: Libvirtd) -> None:
    """A running domain keeps its QEMU pid across a new backend and a libvirtd restart; kill stops it."""
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None or shutil.which("qemu-img") is None:
        pytest.skip("qemu-system-x86_64 or qemu-img is not installed")
    with short_dir("lvi") as tmp:
        image = load_image(make_idle_image(tmp / "images").parent, IDLE_IMAGE)
        spec = real_spec(tmp / "vm", image, "idle-vm", qemu)
        create_disk(spec)
        backend = await backend_for(libvirtd)
        try:
            before = time.time()
            launched = await backend.launch(spec)
            assert launched.running and launched.pid is not None and launched.cid == 1000
            assert launched.started_at is not None and before - 2 < launched.started_at <= time.time()
            argv = cmdline(launched.pid)
            assert argv[argv.index("-uuid") + 1] == domain_uuid("idle-vm")
            with pytest.raises(Conflict, match="already running"):
                await backend.launch(spec)
            with pytest.raises(Conflict, match="still running"):
                await backend.forget("idle-vm")

            adopter = await backend_for(libvirtd)  # as after a daemon restart
            try:
                assert await adopter.runtimes() == {"idle-vm": launched}
            finally:
                await adopter.close()
            libvirtd.restart()  # libvirt reconnects to its running QEMU
            assert await backend.runtime("idle-vm") == launched
            # Killed at once, while libvirtd may still be reconnecting: still a clean stop.
            await backend.kill("idle-vm")
            assert await backend.runtime("idle-vm") == Runtime(status="stopped", cid=1000)
            assert not cmdline(launched.pid)
            again = await backend.launch(spec)
            assert again.running and again.pid not in (None, launched.pid)
            await backend.kill("idle-vm")
            await backend.forget("idle-vm")
            assert await backend.runtime("idle-vm") is None
        finally:
            with contextlib.suppress(Exception):
                await backend.kill("idle-vm")
                await backend.forget("idle-vm")
            await backend.close()
