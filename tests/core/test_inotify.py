"""DirWatch on the real kernel's inotify: what makes a key dirty, and every way it falls back."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmm.core.inotify import DirWatch

NAMES = ("config.json", "shared")


def settled(watch: DirWatch, key: str, *directories: Path, names: tuple[str, ...] | None = NAMES,
            ) -> bool:
    """Watch ``key``, then settle it as a reload would: poll first, watch, (check), settle."""
    epoch = watch.poll()
    ok = watch.watch(key, [str(d) for d in directories], names)
    watch.settle(key, epoch)
    return ok


def clean_after_poll(watch: DirWatch, key: str) -> bool:
    watch.poll()
    return watch.is_clean(key)


def replace_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def queue_limit() -> int:
    """The kernel's inotify queue length; skips a test that must overflow a huge one."""
    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    if limit > 200_000:
        pytest.skip(f"max_queued_events is {limit}: too many events to force an overflow")
    return limit


def made_dirs(parent: Path, *names: str) -> list[Path]:
    paths = [parent / name for name in names]
    for path in paths:
        path.mkdir()
    return paths


@pytest.fixture
def watch() -> Iterator[DirWatch]:
    found = DirWatch()
    if not found.available:
        pytest.skip("inotify is not available here")
    try:
        yield found
    finally:
        found.close()


def test_a_settled_key_stays_clean_until_a_named_entry_changes(tmp_path: Path,
                                                               watch: DirWatch) -> None:
    """Writes to other entries (a log) do not count; an atomic replace of a named one does."""
    (tmp_path / "config.json").write_bytes(b"{}")
    assert settled(watch, "vm", tmp_path)
    assert clean_after_poll(watch, "vm")
    with (tmp_path / "serial.log").open("ab") as log:
        log.write(b"booting\n" * 100)
    assert clean_after_poll(watch, "vm")
    replace_atomically(tmp_path / "config.json", b"{}")
    assert not clean_after_poll(watch, "vm")
    assert settled(watch, "vm", tmp_path)
    assert clean_after_poll(watch, "vm")


@pytest.mark.parametrize("change", ["same-size edit", "still open", "chmod", "utime", "delete"])
def test_changes_in_place_make_the_key_dirty(tmp_path: Path, watch: DirWatch, change: str) -> None:
    """An edit that keeps the inode and size (closed or not yet), or only metadata, counts."""
    config = tmp_path / "config.json"
    config.write_bytes(b'{"a": 1}')
    assert settled(watch, "vm", tmp_path)
    if change == "still open":  # the writer has not closed it: no IN_CLOSE_WRITE yet
        with config.open("r+b", buffering=0) as fp:
            fp.write(b'{"a": 2}')
            assert not clean_after_poll(watch, "vm")
        return
    if change == "same-size edit":
        with config.open("r+b") as fp:
            fp.write(b'{"a": 2}')
    elif change == "chmod":
        config.chmod(0o600)
    elif change == "utime":
        os.utime(config, ns=(1, 1))
    else:
        config.unlink()
    assert not clean_after_poll(watch, "vm")


def test_a_child_directory_created_replaced_or_written_is_seen(tmp_path: Path,
                                                               watch: DirWatch) -> None:
    """A missing child is fine (its creation shows in the parent); a replaced one is re-watched."""
    shared = tmp_path / "shared"
    assert settled(watch, "vm", tmp_path, shared)  # no shared/ yet
    shared.mkdir()
    assert not clean_after_poll(watch, "vm")
    assert settled(watch, "vm", tmp_path, shared)
    (shared / "config.json").write_bytes(b"x")
    assert not clean_after_poll(watch, "vm")

    assert settled(watch, "vm", tmp_path, shared)
    old = tmp_path.parent / f"{tmp_path.name}-old-shared"
    shared.rename(old)
    shared.mkdir()
    assert not clean_after_poll(watch, "vm")
    assert settled(watch, "vm", tmp_path, shared)
    (old / "config.json").write_bytes(b"old")  # the directory no longer there: not watched
    assert clean_after_poll(watch, "vm")
    (shared / "config.json").write_bytes(b"new")
    assert not clean_after_poll(watch, "vm")


def test_a_directory_replaced_under_the_same_name_is_watched_anew(tmp_path: Path,
                                                                  watch: DirWatch) -> None:
    """Moving the directory away dirties the key; re-watching follows the new directory."""
    vm_dir = tmp_path / "vm"
    vm_dir.mkdir()
    assert settled(watch, "vm", vm_dir)
    vm_dir.rename(tmp_path / "moved")
    vm_dir.mkdir()
    assert not clean_after_poll(watch, "vm")
    assert settled(watch, "vm", vm_dir)
    assert watch.watches == 1  # the moved directory's watch was released
    (tmp_path / "moved" / "config.json").write_bytes(b"old")
    assert clean_after_poll(watch, "vm")
    (vm_dir / "config.json").write_bytes(b"new")
    assert not clean_after_poll(watch, "vm")


def test_a_deleted_directory_leaves_its_key_dirty(tmp_path: Path, watch: DirWatch) -> None:
    """The kernel drops the watch of a deleted directory; its key cannot be settled again."""
    vm_dir = tmp_path / "vm"
    vm_dir.mkdir()
    assert settled(watch, "vm", vm_dir)
    vm_dir.rmdir()
    assert not clean_after_poll(watch, "vm")
    assert not settled(watch, "vm", vm_dir)
    assert not clean_after_poll(watch, "vm")
    assert watch.watches == 0


def test_an_event_read_by_a_later_poll_keeps_the_key_dirty(tmp_path: Path,
                                                           watch: DirWatch) -> None:
    """A write after the check's poll, read by another caller's poll, outlives the settle."""
    assert settled(watch, "vm", tmp_path)
    epoch = watch.poll()  # a reload polls, then stamps...
    (tmp_path / "config.json").write_bytes(b"x")  # ...a write lands after its stamp...
    watch.poll()  # ...and a concurrent reload reads the event
    watch.settle("vm", epoch)  # the first reload settles what it checked
    assert not watch.is_clean("vm")


def test_keys_beyond_the_watch_limit_stay_dirty(tmp_path: Path) -> None:
    """With the limit reached, a key cannot be watched and is never clean; the others are."""
    watch = DirWatch(max_watches=2)
    dirs = [tmp_path / name for name in ("a", "b", "c")]
    for directory in dirs:
        directory.mkdir()
    assert [settled(watch, d.name, d) for d in dirs] == [True, True, False]
    assert watch.dirty_among(["a", "b", "c"]) == ["c"]
    assert watch.watches == 2
    watch.forget("a")
    assert settled(watch, "c", dirs[2])
    assert watch.dirty_among(["a", "b", "c"]) == ["a"]
    watch.close()


def test_a_queue_overflow_makes_every_key_dirty(tmp_path: Path, watch: DirWatch) -> None:
    """Events lost to IN_Q_OVERFLOW (forced for real) dirty keys that had none themselves."""
    limit = queue_limit()
    busy, quiet = made_dirs(tmp_path, "busy", "quiet")
    assert settled(watch, "busy", busy, names=None)
    assert settled(watch, "quiet", quiet)
    files = [busy / "a", busy / "b"]
    for path in files:
        path.write_bytes(b"")
    for n in range(limit + 10):  # alternate files: identical consecutive events would merge
        os.utime(files[n % 2], ns=(n, n))
    assert not clean_after_poll(watch, "quiet")
    assert not watch.is_clean("busy")
    assert settled(watch, "quiet", quiet)  # after the overflow is read, keys settle again
    assert clean_after_poll(watch, "quiet")


def test_polling_between_bursts_avoids_the_overflow(tmp_path: Path, watch: DirWatch) -> None:
    """Two bursts of 60% of the queue each: read in between (the watcher's drain), nothing is
    lost and a quiet key stays clean; read only at the end, they overflow it."""
    limit = queue_limit()
    busy, quiet = made_dirs(tmp_path, "busy", "quiet")
    files = [busy / "serial.log", busy / "stdout.log"]
    for path in files:
        path.write_bytes(b"")

    def burst() -> None:
        for n in range(limit * 6 // 10):
            os.utime(files[n % 2], ns=(n, n))

    for drain_between in (True, False):
        assert settled(watch, "busy", busy)  # the logs are not among its names
        assert settled(watch, "quiet", quiet)
        burst()
        if drain_between:
            watch.poll()
        burst()
        assert clean_after_poll(watch, "quiet") == drain_between


def test_without_inotify_nothing_is_ever_clean(tmp_path: Path) -> None:
    """inotify unavailable: watch refuses, so every key is checked the slow way."""
    watch = DirWatch(enabled=False)
    assert not watch.available
    assert not settled(watch, "vm", tmp_path)
    assert not clean_after_poll(watch, "vm")
    assert watch.dirty_among(["vm"]) == ["vm"]


def test_retain_and_close_release_the_watches(tmp_path: Path, watch: DirWatch) -> None:
    """Keys not retained lose their watches and their state; close releases the rest."""
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        assert settled(watch, name, tmp_path / name)
    watch.retain({"b"})
    assert watch.watches == 1
    assert watch.dirty_among(["a", "b"]) == ["a"]
    watch.close()
    assert watch.watches == 0
    assert watch.dirty_among(["b"]) == ["b"]
