"""The development image under QEMU with the daemon's serial channels: guest API and host API."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from guest_agent import BOOT_MARKER
from tests.guest_agent.agent_harness import FrameStream, GuestApiClient, HostApiPeer, connect_unix
from tests.support.guest_image import ensure_guest_image
from tests.support.short_dirs import short_dir

MEMORY_MB = 512
CPUS = 2
APP_ID = "5eed000000000000000000000000000000000a11"


def serial_channel_argv(workdir: Path) -> list[str]:
    """The virtio-serial devices exactly as vmm/qemu_argv.py emits them in serial mode."""
    return [
        "-device", "virtio-serial-pci,id=vser0",
        "-chardev", f"socket,id=agentch,path={workdir / 'agent.sock'},server=on,wait=off",
        "-device", "virtserialport,bus=vser0.0,chardev=agentch,name=org.vmm.guest-agent",
        "-chardev", f"socket,id=hostch,path={workdir / 'host-api.sock'},server=on,wait=off",
        "-device", "virtserialport,bus=vser0.0,chardev=hostch,name=org.vmm.host-api",
    ]  # fmt: skip


@pytest.mark.qemu
def test_serial_guest_api_and_host_api_on_a_real_boot() -> None:
    """Boot progress reaches "done", the guest API answers real data, Shutdown powers off."""
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        pytest.skip("qemu-system-x86_64 is not installed")
    image = ensure_guest_image()
    metadata = json.loads((image / "metadata.json").read_text())
    with short_dir("gaq") as workdir:
        run_vm(qemu, image, metadata, workdir)


def run_vm(qemu: str, image: Path, metadata: dict[str, str], workdir: Path) -> None:
    shared = workdir / "shared"
    shared.mkdir()
    (shared / "app-compose.json").write_text(json.dumps({"manifest_version": 2, "name": "serial"}))
    (shared / ".instance_info").write_text(json.dumps({"app_id": APP_ID}))
    hda = workdir / "hda.img"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2",
         "-o", f"backing_file={image / metadata['hda']}", "-o", "backing_fmt=qcow2", str(hda), "4G"],
        check=True,
    )  # fmt: skip
    serial_log = workdir / "serial.log"
    argv = [
        qemu, "-accel", "tcg", "-cpu", "max", "-nodefaults", "-nographic",
        "-machine", "q35,kernel-irqchip=split,hpet=off", "-m", str(MEMORY_MB), "-smp", str(CPUS),
        "-chardev", f"file,id=com0,path={serial_log}", "-serial", "chardev:com0",
        "-kernel", str(image / metadata["kernel"]), "-initrd", str(image / metadata["initrd"]),
        "-drive", f"file={hda},if=none,id=hd1", "-device", "virtio-blk-pci,drive=hd1",
        "-netdev", "user,id=net0,net=10.0.2.0/24,dhcpstart=10.0.2.10",
        "-device", "virtio-net-pci,netdev=net0,romfile=",
        "-virtfs", f"local,path={shared},mount_tag=host-shared,readonly=on,"
                   "security_model=mapped,id=virtfs0",
        *serial_channel_argv(workdir),
        "-append", metadata["cmdline"],
    ]  # fmt: skip
    started = time.monotonic()
    with (workdir / "qemu.out").open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    stream: FrameStream | None = None
    try:
        peer = HostApiPeer(lambda: connect_unix(workdir / "host-api.sock", 1.0))
        with peer:
            stream = FrameStream(connect_unix(workdir / "agent.sock", 10))
            client = GuestApiClient(stream)
            try:
                peer.wait_for("boot.progress", "done", timeout=120)
            except TimeoutError:
                pytest.fail(f"no boot.progress done:\n{serial_log.read_text(errors='replace')}")
            done_s = time.monotonic() - started
            console = serial_log.read_text(errors="replace")
            assert [line.strip() for line in console.splitlines()].count(BOOT_MARKER) == 1, console
            events = peer.notifications()
            assert events[0] == ("boot.progress", "mounting host share"), events
            assert not [e for e in events if e[0] == "boot.error"], events

            info = json.loads(peer.wait_for("instance.info", timeout=5))
            seed = bytes.fromhex(info["instance_id_seed"])
            assert info["app_id"] == APP_ID
            assert info["instance_id"] == hashlib.sha256(seed + bytes.fromhex(APP_ID)).hexdigest()[:40]

            status, guest = client.call("Info", timeout=30)
            assert status == 200
            assert (guest["app_id"], guest["instance_id"]) == (APP_ID, info["instance_id"])

            status, sys_info = client.call("SysInfo", timeout=30)
            assert status == 200, sys_info
            assert sys_info["num_cpus"] == CPUS
            total = MEMORY_MB * 1024 * 1024
            # The kernel keeps its image and early reservations out of MemTotal.
            assert 0.85 * total < sys_info["total_memory"] <= total, sys_info
            assert sys_info["os_name"] == "Debian GNU/Linux"
            assert any(d["name"] == "/dev/vda" and d["mount_point"] == "/" for d in sys_info["disks"])

            status, net = client.call("NetworkInfo", timeout=30)
            assert status == 200
            eth0 = next(i for i in net["interfaces"] if i["name"] == "eth0")
            assert any(a["address"].startswith("10.0.2.") and a["prefix"] == 24 for a in eth0["addresses"])
            assert {"address": "10.0.2.2"} in net["gateways"]

            assert client.call("Shutdown", timeout=30) == (200, None)
            peer.wait_for("shutdown.progress", "powering off", timeout=30)
            powerdown = time.monotonic()
            returncode = proc.wait(timeout=30)
            exit_s = time.monotonic() - powerdown
        assert returncode == 0
        print(
            f"boot to done {done_s:.2f} s; shutdown.progress to exit {exit_s:.2f} s; "
            f"MemTotal {sys_info['total_memory'] / total:.3f} of -m"
        )
    finally:
        if stream is not None:
            stream.close()
        if proc.poll() is None:
            proc.kill()
        proc.wait()
