"""Bounded VM logs: copy-then-truncate rotation at start and by size, followed by /logs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support.short_dirs import short_dir
from tests.support.vm_ops import (
    create,
    idle_daemon,
    qemu_pid_of,
    rpc,
    wait_for,
)
from vmm.vms.log_rotation import disk_usage, rotate, rotate_if_over

MAX_BYTES = 64 * 1024
MAX_BACKUPS = 2
LOG_CONFIG = (f"[cvm.log]\nmax_bytes = {MAX_BYTES}\nmax_backups = {MAX_BACKUPS}\n"
              "check_interval_secs = 1\n")


def test_rotate_shifts_backups_and_drops_the_oldest(tmp_path: Path) -> None:
    """X → X.1 → X.2; the generation beyond max_backups is dropped; X is emptied in place."""
    log = tmp_path / "serial.log"
    log.touch()
    inode = log.stat().st_ino
    for generation in range(1, 5):
        with log.open("a") as writer:
            writer.write(f"generation {generation}\n")
        assert rotate(log, MAX_BYTES, MAX_BACKUPS)
        assert log.stat().st_size == 0
        assert log.stat().st_ino == inode  # truncated in place, never replaced
    assert (tmp_path / "serial.log.1").read_text() == "generation 4\n"
    assert (tmp_path / "serial.log.2").read_text() == "generation 3\n"
    assert not (tmp_path / "serial.log.3").exists()
    assert not rotate(log, MAX_BYTES, MAX_BACKUPS)  # nothing to rotate in an empty file


def test_append_writer_continues_at_the_start(tmp_path: Path) -> None:
    """A writer holding an O_APPEND descriptor writes at the new end, leaving no hole."""
    log = tmp_path / "stdout.log"
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"x" * 5000 + b"\n")
        assert rotate(log, MAX_BYTES, MAX_BACKUPS)
        os.write(fd, b"after\n")
    finally:
        os.close(fd)
    assert log.read_bytes() == b"after\n"
    assert (tmp_path / "stdout.log.1").read_bytes() == b"x" * 5000 + b"\n"


def test_backups_keep_only_the_tail(tmp_path: Path) -> None:
    """A log far over max_bytes leaves a backup of at most max_bytes: a note, then the newest lines."""
    log = tmp_path / "serial.log"
    lines = [f"line {i:07d} {'.' * 50}\n" for i in range(20_000)]  # ~1.2 MB
    log.write_text("".join(lines))
    assert not rotate_if_over(tmp_path / "missing.log", MAX_BYTES, MAX_BACKUPS)
    assert rotate_if_over(log, MAX_BYTES, MAX_BACKUPS)
    backup = (tmp_path / "serial.log.1").read_text()
    assert len(backup.encode()) <= MAX_BYTES
    assert backup.startswith("[vmm] older output dropped")
    assert backup.endswith(lines[-1])
    assert backup.splitlines()[1] in {line.rstrip("\n") for line in lines}  # no torn first line
    assert not rotate_if_over(log, MAX_BYTES, MAX_BACKUPS)  # now empty: under the limit


def test_backups_beyond_a_smaller_setting_are_removed(tmp_path: Path) -> None:
    """Lowering max_backups removes the surplus at the next rotation; 0 keeps none."""
    log = tmp_path / "stderr.log"
    for n in range(1, 6):
        (tmp_path / f"stderr.log.{n}").write_text(str(n))
    log.write_text("live\n")
    rotate(log, MAX_BYTES, 0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stderr.log"]
    assert disk_usage(log) == 0


@pytest.mark.qemu
def test_flood_stays_within_the_bound_and_logs_follow_rotation() -> None:
    """100 MB into a running VM's serial log ends within max_bytes*(backups+1); /logs follows on."""
    with short_dir("vmmr") as workdir, idle_daemon(workdir, extra=LOG_CONFIG) as daemon, \
            daemon.client() as client:
        vm_id = create(client)
        vm_dir = workdir / "state" / "vm" / vm_id
        wait_for("QEMU", lambda: qemu_pid_of(vm_dir))
        serial = vm_dir / "serial.log"
        bound = MAX_BYTES * (MAX_BACKUPS + 1)

        with client.stream("GET", "/logs", params={"id": vm_id, "follow": "true",
                                                    "lines": "0"}) as stream:
            chunks = stream.iter_text()

            def seen(marker: str) -> None:
                text = ""
                while marker not in text:
                    text += next(chunks)  # each read is bounded by the client's timeout

            # Appending is exactly what QEMU does with the guest's console output.
            with serial.open("ab") as console:
                console.write(b"before the flood\n")
                console.flush()
                seen("before the flood")
                line = b"flood " + b"#" * 1017 + b"\n"  # 1 KiB
                block = line * 1024
                for _ in range(100):  # 100 MiB
                    console.write(block)
                console.flush()
            wait_for("the rotation to catch up", lambda: disk_usage(serial) <= bound, timeout=60)
            for path in (vm_dir / "stdout.log", vm_dir / "stderr.log"):
                assert disk_usage(path) <= bound
            assert (vm_dir / "serial.log.1").stat().st_size <= MAX_BYTES
            assert not (vm_dir / f"serial.log.{MAX_BACKUPS + 1}").exists()

            with serial.open("ab") as console:
                console.write(b"after the rotation\n")
            seen("after the rotation")


@pytest.mark.qemu
def test_each_start_begins_a_fresh_log() -> None:
    """StartVm rotates the logs first, so serial.log holds this boot and .1 the previous one."""
    with short_dir("vmmr") as workdir, idle_daemon(workdir, extra=LOG_CONFIG) as daemon, \
            daemon.client() as client:
        vm_id = create(client)
        vm_dir = workdir / "state" / "vm" / vm_id
        wait_for("QEMU", lambda: qemu_pid_of(vm_dir))
        with (vm_dir / "serial.log").open("ab") as console:
            console.write(b"first boot output\n")
        rpc(client, "StopVm", {"id": vm_id})
        rpc(client, "StartVm", {"id": vm_id})
        current = (vm_dir / "serial.log").read_text()
        previous = (vm_dir / "serial.log.1").read_text()
        assert current.count("===== boot @") == 1 and "first boot output" not in current
        assert previous.count("===== boot @") == 1 and "first boot output" in previous
