"""StartVm to QEMU exec and to the guest's boot marker, per backend, against bare QEMU.

Rounds alternate: StartVm through a daemon on the QEMU backend (time to the QEMU process
existing, and to VMM-GUEST-BOOT-OK in serial.log); then the very argv that daemon ran, launched
directly with subprocess in the same work directory (the floor: same kernel, same image); then
StartVm through a second daemon on the libvirt backend, over a private libvirtd (define + start
of the domain included). Medians and the ratios are printed; nothing passes or fails on a time.

    .venv/bin/python bench/bench_boot.py [--rounds 3] [--no-libvirt]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from guest_agent import BOOT_MARKER  # noqa: E402
from tests.support.daemon_proc import start_daemon  # noqa: E402
from tests.support.guest_image import ensure_guest_image  # noqa: E402
from tests.support.libvirtd import private_libvirtd  # noqa: E402
from tests.support.short_dirs import short_dir  # noqa: E402

TIMEOUT = 180.0
COMPOSE = json.dumps({"runner": "docker-compose", "docker_compose_file": ""})


def wait(what: str, check: object, timeout: float = TIMEOUT) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()  # type: ignore[operator]
        if value:
            return value
        time.sleep(0.01)
    raise TimeoutError(what)


BOOT_STAMP = b"\n===== boot @ "


def booted(serial: Path) -> bool:
    """The boot marker follows the last boot stamp (StartVm writes one; the bare run too).

    Counting markers in the whole file would not do: each StartVm rotates serial.log.
    """
    try:
        text = serial.read_bytes()
    except FileNotFoundError:
        return False
    return BOOT_MARKER.encode() in text[text.rfind(BOOT_STAMP):]


def qemu_pid(vm_dir: Path) -> int | None:
    try:
        pid = int((vm_dir / "qemu.pid").read_text())
        return pid if b"qemu" in Path(f"/proc/{pid}/cmdline").read_bytes() else None
    except (OSError, ValueError):
        return None


def daemon_config(image: Path, backend: str = "qemu", uri: str = "") -> str:
    config = f'[image]\npath = "{image.parent}"\n[cvm]\naccel = "tcg"\nbackend = "{backend}"\n'
    return config + (f'[libvirt]\nuri = "{uri}"\n' if uri else "")


def create_stopped(client: httpx.Client, image: Path) -> str:
    vm_id: str = client.post("/prpc/CreateVm?json", json={
        "name": "bench", "image": image.name, "compose_file": COMPOSE, "vcpu": 1,
        "memory": 512, "disk_size": 2, "stopped": True}).json()["id"]
    return vm_id


def time_to_marker(client: httpx.Client, vm_id: str, serial: Path) -> float:
    t0 = time.perf_counter()
    assert client.post("/prpc/StartVm?json", json={"id": vm_id}).status_code == 200
    wait("boot marker", lambda: booted(serial))
    elapsed = time.perf_counter() - t0
    assert client.post("/prpc/StopVm?json", json={"id": vm_id}).status_code == 200
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-libvirt", action="store_true", help="measure the QEMU backend only")
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        libvirtd = None if args.no_libvirt else stack.enter_context(private_libvirtd())
        run(args.rounds, libvirtd.uri if libvirtd else "")


def run(rounds: int, libvirt_uri: str) -> None:
    image = ensure_guest_image()
    with short_dir("bb") as workdir, short_dir("bl") as lv_workdir:
        daemon = start_daemon(workdir, extra_config=daemon_config(image))
        lv_daemon = (start_daemon(lv_workdir, extra_config=daemon_config(image, "libvirt", libvirt_uri))
                     if libvirt_uri else None)
        managed_exec, managed_marker, bare_exec, bare_marker = [], [], [], []
        libvirt_marker: list[float] = []
        try:
            with daemon.client() as client, contextlib.ExitStack() as clients:
                lv_client = clients.enter_context(lv_daemon.client()) if lv_daemon else None
                lv_id = create_stopped(lv_client, image) if lv_client else ""
                lv_serial = lv_workdir / "state" / "vm" / lv_id / "serial.log"
                vm_id = create_stopped(client, image)
                vm_dir = workdir / "state" / "vm" / vm_id
                serial = vm_dir / "serial.log"
                argv: list[str] = []
                for _ in range(rounds):
                    t0 = time.perf_counter()
                    assert client.post("/prpc/StartVm?json", json={"id": vm_id}).status_code == 200
                    pid = wait("qemu exec", lambda: qemu_pid(vm_dir))
                    managed_exec.append(time.perf_counter() - t0)
                    wait("boot marker", lambda: booted(serial))
                    managed_marker.append(time.perf_counter() - t0)
                    argv = Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").decode().split("\0")
                    assert client.post("/prpc/StopVm?json", json={"id": vm_id}).status_code == 200

                    with serial.open("ab") as log:
                        log.write(BOOT_STAMP + b"bare =====\n")
                    t0 = time.perf_counter()
                    bare = subprocess.Popen(argv, cwd=vm_dir, stdout=subprocess.DEVNULL,
                                            stderr=subprocess.DEVNULL)
                    try:
                        cmdline = Path(f"/proc/{bare.pid}/cmdline")
                        wait("bare exec", lambda p=cmdline: b"qemu" in p.read_bytes())
                        bare_exec.append(time.perf_counter() - t0)
                        wait("bare boot marker", lambda: booted(serial))
                        bare_marker.append(time.perf_counter() - t0)
                    finally:
                        os.kill(bare.pid, signal.SIGKILL)
                        bare.wait(timeout=30)

                    if lv_client is not None:
                        libvirt_marker.append(time_to_marker(lv_client, lv_id, lv_serial))
        finally:
            if lv_daemon is not None:
                lv_daemon.destroy()
            daemon.destroy()

        def show(label: str, values: list[float]) -> float:
            median = statistics.median(values)
            print(f"{label:34s} median {median:6.3f} s   rounds {[round(v, 3) for v in values]}")
            return median

        show("StartVm -> QEMU exec", managed_exec)
        show("bare Popen -> QEMU exec", bare_exec)
        managed = show("StartVm -> boot marker (qemu)", managed_marker)
        floor = show("bare QEMU -> boot marker", bare_marker)
        print(f"ratio boot marker qemu/bare         {managed / floor:.2f}  (aim <= 1.05)")
        if libvirt_marker:
            libvirt = show("StartVm -> boot marker (libvirt)", libvirt_marker)
            print(f"ratio boot marker libvirt/bare      {libvirt / floor:.2f}  (aim <= 1.30)")


if __name__ == "__main__":
    main()
