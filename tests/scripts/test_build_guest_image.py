"""scripts/build-guest-image: the cached development image, and a real boot of it under TCG."""

import contextlib
import gzip
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from guest_agent import BOOT_MARKER
from tests.support.guest_image import (
    BUILD_SCRIPT,
    CACHE_DIR,
    REPO,
    ensure_guest_image,
    load_build_script,
    run_build,
)
from tests.support.qmp import QMPClient

METADATA_KEYS = {"kernel", "initrd", "hda", "cmdline", "version", "is_dev", "shared_ro"}


def image_files(image: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(image.iterdir())}


def last_line(stdout: str) -> Path:
    return Path(stdout.strip().splitlines()[-1])


def test_second_build_is_a_cache_hit_with_complete_metadata() -> None:
    """A second build with unchanged inputs rewrites nothing and metadata names existing files."""
    image = ensure_guest_image()
    before = image_files(image)

    started = time.monotonic()
    result = run_build("--images-dir", str(image.parent), "--name", image.name)
    elapsed = time.monotonic() - started

    assert result.returncode == 0, result.stderr
    assert last_line(result.stdout) == image
    assert image_files(image) == before
    assert elapsed < 3.0, f"cache hit took {elapsed:.2f} s"

    metadata = json.loads((image / "metadata.json").read_text())
    assert set(metadata) == METADATA_KEYS
    assert metadata["version"] == "0.5.0"
    assert metadata["is_dev"] is True
    assert metadata["shared_ro"] is True
    assert "console=ttyS0" in metadata["cmdline"].split()
    for key in ("kernel", "initrd", "hda"):
        assert (image / metadata[key]).is_file(), key
    assert (image / metadata["kernel"]).read_bytes()[:4] == b"\x7fELF"
    assert (image / metadata["initrd"]).read_bytes()[:2] == b"\x1f\x8b"
    assert (image / metadata["hda"]).read_bytes()[:4] == b"QFI\xfb"


def copy_build_inputs(dest: Path) -> Path:
    """A minimal repository copy (script + guest_agent) whose inputs a test may change."""
    (dest / "scripts").mkdir(parents=True)
    script = dest / "scripts" / BUILD_SCRIPT.name
    shutil.copy2(BUILD_SCRIPT, script)
    shutil.copytree(REPO / "guest_agent", dest / "guest_agent", ignore=shutil.ignore_patterns("__pycache__"))
    return script


def build_copy(script: Path, images: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(script), "--images-dir", str(images), "--cache-dir", str(CACHE_DIR)],
        capture_output=True,
        text=True,
        timeout=15 * 60,
        check=False,
    )


def test_changed_agent_source_rebuilds_the_image(tmp_path: Path) -> None:
    """Changing any guest_agent file changes the input hash and rebuilds the image."""
    ensure_guest_image()  # the kernel and debootstrap caches are then warm
    script = copy_build_inputs(tmp_path / "repo")
    images = tmp_path / "images"

    first = build_copy(script, images)
    assert first.returncode == 0, first.stderr
    image = last_line(first.stdout)
    stamp_before = (image / ".build-stamp").read_text()
    before = image_files(image)

    with (script.parent.parent / "guest_agent" / "__init__.py").open("a") as f:
        f.write("# changed\n")
    second = build_copy(script, images)
    assert second.returncode == 0, second.stderr
    assert last_line(second.stdout) == image
    assert (image / ".build-stamp").read_text() != stamp_before
    assert image_files(image)["rootfs.qcow2"] != before["rootfs.qcow2"]
    assert sorted(p.name for p in images.iterdir()) == [image.name]
    shutil.rmtree(images)  # ~200 MB; pytest keeps recent temp dirs


def test_interrupted_build_leaves_no_image(tmp_path: Path) -> None:
    """A build killed midway leaves no image directory; the next build completes and cleans up."""
    ensure_guest_image()
    script = copy_build_inputs(tmp_path / "repo")
    images = tmp_path / "images"
    proc = subprocess.Popen(
        [str(script), "--images-dir", str(images), "--cache-dir", str(CACHE_DIR)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not (images.is_dir() and any(images.glob(".vmm-dev-0.5.0.tmp-*"))):
            assert proc.poll() is None, "build finished before it could be interrupted"
            assert time.monotonic() < deadline, "no staging directory appeared"
            time.sleep(0.01)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (images / "vmm-dev-0.5.0").exists()

    result = build_copy(script, images)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in images.iterdir()) == ["vmm-dev-0.5.0"]
    shutil.rmtree(images)


def test_mirror_comes_from_deb822_and_one_line_sources(tmp_path: Path) -> None:
    """The debootstrap mirror is the apt source for bookworm/main, in either sources format."""
    build = load_build_script()
    etc = tmp_path / "apt"
    (etc / "sources.list.d").mkdir(parents=True)
    (etc / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\nURIs: http://mirror.example/debian-security\n"
        "Suites: bookworm-security\nComponents: main\n\n"
        "Types: deb deb-src\n# a comment\nURIs: http://mirror.example/debian/\n"
        "Suites: bookworm bookworm-updates\nComponents: main contrib\n"
    )
    (etc / "sources.list.d" / "other.list.disabled").write_text(
        "deb http://wrong.example/debian bookworm main\n"
    )
    assert build.resolve_mirror(etc) == "http://mirror.example/debian"

    one_line = tmp_path / "apt1"
    one_line.mkdir()
    (one_line / "sources.list").write_text(
        "# deb http://commented.example/debian bookworm main\n"
        "deb [signed-by=/k.gpg] http://one.example/debian bookworm main\n"
    )
    assert build.resolve_mirror(one_line) == "http://one.example/debian"


def test_initramfs_has_init_busybox_console_and_modules() -> None:
    """The initramfs holds /init, busybox, a /dev/console node and the listed kernel modules."""
    image = ensure_guest_image()
    archive = gzip.decompress((image / "initramfs.cpio.gz").read_bytes())
    listing = subprocess.run(
        ["cpio", "-itv", "--quiet"], input=archive, capture_output=True, check=True
    ).stdout.decode()
    names = {line.split()[-1] for line in listing.splitlines() if "->" not in line}
    assert {"init", "bin/busybox", "dev/console", "etc/vmm-modules"} <= names
    console = next(line for line in listing.splitlines() if line.endswith(" dev/console"))
    assert console.startswith("crw")
    wanted = ("virtio_pci.ko", "virtio_blk.ko", "ext4.ko", "virtio_net.ko", "9p.ko", "evdev.ko")
    for module in wanted:
        assert any(n.endswith("/" + module) for n in names), module


# ---------------------------------------------------------------------------------------------
# A real boot


def wait_for_marker(serial_log: Path, proc: subprocess.Popen[bytes], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = serial_log.read_text(errors="replace") if serial_log.exists() else ""
        if BOOT_MARKER in (line.strip() for line in text.splitlines()):
            return text
        if proc.poll() is not None:
            pytest.fail(f"QEMU exited with {proc.returncode} before the marker:\n{text}")
        time.sleep(0.05)
    pytest.fail(f"no {BOOT_MARKER} within {timeout} s:\n{serial_log.read_text(errors='replace')}")


def forwarded_port(usernet: str, guest_port: int) -> int:
    for match in re.finditer(r"TCP\[HOST_FORWARD\]\s+\d+\s+(\S+)\s+(\d+)\s+(\S+)\s+(\d+)", usernet):
        if int(match.group(4)) == guest_port:
            return int(match.group(2))
    raise AssertionError(f"no host forward to guest port {guest_port}:\n{usernet}")


def http_get_json(url: str, timeout: float) -> dict[str, object]:
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


@pytest.mark.qemu
def test_image_boots_reports_compose_serves_http_and_powers_off(tmp_path: Path) -> None:
    """The image boots under TCG, prints the compose hash and marker, serves :8080, powers off."""
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        pytest.skip("qemu-system-x86_64 is not installed")
    image = ensure_guest_image()
    metadata = json.loads((image / "metadata.json").read_text())

    shared = tmp_path / "shared"
    shared.mkdir()
    compose = json.dumps({"manifest_version": 2, "name": "boot-test"}).encode()
    (shared / "app-compose.json").write_bytes(compose)
    compose_sha = hashlib.sha256(compose).hexdigest()

    hda = tmp_path / "hda.img"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2",
         "-o", f"backing_file={image / metadata['hda']}", "-o", "backing_fmt=qcow2",
         str(hda), "4G"],
        check=True,
    )  # fmt: skip
    serial_log = tmp_path / "serial.log"
    qmp_sock = tmp_path / "qmp.sock"
    argv = [
        qemu, "-accel", "tcg", "-cpu", "max", "-nodefaults", "-nographic",
        "-machine", "q35,kernel-irqchip=split,hpet=off", "-m", "512", "-smp", "1",
        "-chardev", f"pty,id=com0,logfile={serial_log},logappend=on", "-serial", "chardev:com0",
        "-qmp", f"unix:{qmp_sock},server,wait=off",
        "-kernel", str(image / metadata["kernel"]), "-initrd", str(image / metadata["initrd"]),
        "-drive", f"file={hda},if=none,id=hd1", "-device", "virtio-blk-pci,drive=hd1",
        "-netdev", "user,id=net0,net=10.0.2.0/24,dhcpstart=10.0.2.10,"
                   "hostfwd=tcp:127.0.0.1:0-:8080",
        "-device", "virtio-net-pci,netdev=net0,romfile=",
        "-virtfs", f"local,path={shared},mount_tag=host-shared,readonly=on,"
                   "security_model=mapped,id=virtfs0",
        "-append", metadata["cmdline"],
    ]  # fmt: skip
    with (tmp_path / "qemu.out").open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    try:
        started = time.monotonic()
        text = wait_for_marker(serial_log, proc, timeout=90)
        boot_s = time.monotonic() - started
        lines = [line.strip() for line in text.splitlines()]
        assert f"vmm-guest: compose-sha256={compose_sha}" in lines, text

        with QMPClient(qmp_sock) as qmp:
            port = forwarded_port(qmp.hmp("info usernet"), 8080)
            body = http_get_json(f"http://127.0.0.1:{port}/", timeout=30)
            assert body["service"] == "vmm-guest"
            assert body["compose_sha256"] == compose_sha
            assert isinstance(body["uptime"], float)
            assert body["hostname"] == "vmm-guest"

            powerdown = time.monotonic()
            qmp.execute("system_powerdown")
            returncode = proc.wait(timeout=30)
        exit_s = time.monotonic() - powerdown
        assert returncode == 0
        print(f"boot to marker {boot_s:.2f} s, powerdown to exit {exit_s:.2f} s")
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
