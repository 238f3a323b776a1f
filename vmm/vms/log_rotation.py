"""Bounded VM logs: ``serial.log``, ``stdout.log`` and ``stderr.log`` rotated by size (``[cvm.log]``).

A log is rotated when a VM starts (so the live file holds the current boot) and, while the VM
runs, whenever it has grown over ``max_bytes`` at a check (every ``check_interval_secs``).
Rotation is copy-then-truncate: ``X.1`` … ``X.<max_backups>`` shift up by one (the oldest is
dropped), the tail of ``X`` is copied to ``X.1``, and ``X`` is truncated in place. Renaming ``X``
away would not work: QEMU keeps writing to the file it opened. Truncating in place is safe
because every writer (QEMU's chardev logfile with ``logappend=on``, the supervisor's stdout and
stderr files) opened the file with O_APPEND, so its next write lands at the new end, not at its
old offset behind a hole. Bytes appended between the copy and the truncation are lost, as with
logrotate's copytruncate.

Only the last ``max_bytes`` of ``X`` are copied, so each backup is at most ``max_bytes`` even if a
guest wrote far more between two checks; a one-line note at the top of the backup says how much
older output was dropped. Right after a check every channel therefore holds at most
``max_bytes * (max_backups + 1)`` bytes on disk. ``max_bytes = 0`` turns rotation off.

All file work runs in a worker thread: a copy of several megabytes must not stall the API.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from vmm.core.config import LogConfig
from vmm.core.fsutil import fsync_dir
from vmm.model.vm import Vm
from vmm.model.workdir import Workdir

log = logging.getLogger(__name__)

_COPY_CHUNK = 1024 * 1024
# Rotations of one file must not interleave (a start and a periodic check could meet); they are
# short, so one lock for all files is enough.
_lock = threading.Lock()
_rotated_bytes = 0  # taken out of live logs since the daemon started (under _lock)


def rotated_bytes() -> int:
    """Bytes taken out of live logs by rotation in this process (what the metrics report)."""
    with _lock:
        return _rotated_bytes


def channel_paths(workdir: Workdir) -> tuple[Path, Path, Path]:
    return workdir.serial_log, workdir.stdout_log, workdir.stderr_log


def backup_path(path: Path, n: int) -> Path:
    return path.with_name(f"{path.name}.{n}")


def rotate(path: Path, max_bytes: int, max_backups: int) -> bool:
    """Rotate ``path`` now if it has any content; return whether it did."""
    global _rotated_bytes  # noqa: PLW0603 - one process-wide tally, guarded by _lock
    with _lock:
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return False
        if size == 0:
            return False
        _drop_extra_backups(path, max_backups)
        if max_backups > 0:
            for n in range(max_backups - 1, 0, -1):
                older = backup_path(path, n)
                if older.exists():
                    older.replace(backup_path(path, n + 1))
            _copy_tail(path, backup_path(path, 1), size, max_bytes)
        os.truncate(path, 0)
        _rotated_bytes += size
        return True


def rotate_if_over(path: Path, max_bytes: int, max_backups: int) -> bool:
    try:
        if path.stat().st_size <= max_bytes:
            return False
    except FileNotFoundError:
        return False
    return rotate(path, max_bytes, max_backups)


def disk_usage(path: Path) -> int:
    """Bytes ``path`` and its numbered backups take (what the bound is about)."""
    total = 0
    for candidate in path.parent.glob(f"{path.name}*"):
        suffix = candidate.name[len(path.name):]
        if suffix == "" or (suffix.startswith(".") and suffix[1:].isdigit()):
            total += candidate.stat().st_size
    return total


def _drop_extra_backups(path: Path, max_backups: int) -> None:
    """Remove backups numbered above ``max_backups`` (left by a larger setting earlier)."""
    prefix = f"{path.name}."
    for candidate in path.parent.glob(f"{path.name}.*"):
        number = candidate.name[len(prefix):]
        if number.isdigit() and int(number) > max_backups:
            candidate.unlink(missing_ok=True)


def _copy_tail(source: Path, target: Path, size: int, max_bytes: int) -> None:
    """Copy at most the last ``max_bytes`` of ``source`` (its first ``size`` bytes) to ``target``."""
    start = max(size - max_bytes, 0)
    note = b""
    if start:
        note = (f"[vmm] older output dropped; this backup keeps at most the last {max_bytes} "
                "bytes (cvm.log.max_bytes)\n").encode()
        if len(note) * 2 > max_bytes:
            note = b""
        start = min(start + len(note), size)  # the note counts against the budget
    tmp = target.with_name(f".{target.name}.tmp")
    with source.open("rb") as src, tmp.open("wb") as dst:
        src.seek(start)
        if start:
            dst.write(note)
            # Begin at the next line when one starts close by: no torn first line.
            head = src.read(min(4096, size - start))
            newline = head.find(b"\n")
            dst.write(head[newline + 1:] if newline >= 0 else head)
        remaining = size - src.tell()
        while remaining > 0:
            chunk = src.read(min(_COPY_CHUNK, remaining))
            if not chunk:
                break
            dst.write(chunk)
            remaining -= len(chunk)
    tmp.replace(target)
    fsync_dir(target.parent)


async def rotate_for_boot(workdir: Workdir, config: LogConfig) -> None:
    """Rotate every channel of a VM about to boot, so the live logs start with this boot."""
    if config.max_bytes <= 0:
        return

    def work() -> None:
        for path in channel_paths(workdir):
            rotate(path, config.max_bytes, config.max_backups)

    await asyncio.to_thread(work)


class LogRotation:
    """The periodic size check over running VMs, driven by the manager's watcher (``tick``)."""

    def __init__(
        self,
        config: LogConfig,
        vms: Callable[[], Iterable[Vm]],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self._vms = vms
        self._clock = clock
        self._next_check = 0.0

    async def tick(self) -> None:
        if self.config.max_bytes <= 0:
            return
        now = self._clock()
        if now < self._next_check:
            return
        self._next_check = now + self.config.check_interval_secs
        paths = [path for vm in self._vms() if vm.running for path in channel_paths(vm.workdir)]
        if paths:
            await asyncio.to_thread(self._check, paths)

    def _check(self, paths: list[Path]) -> None:
        for path in paths:
            try:
                if rotate_if_over(path, self.config.max_bytes, self.config.max_backups):
                    log.info("rotated %s (over %d bytes)", path, self.config.max_bytes)
            except OSError as exc:
                # A VM removed meanwhile takes its directory with it; anything else is worth a line.
                if path.parent.exists():
                    log.warning("cannot rotate %s: %s", path, exc)
