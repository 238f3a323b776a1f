"""The cheap checks of ReloadVms and start-up: file stamps and the leftover-update probe."""

from __future__ import annotations

import os
from pathlib import Path

from vmm.model.manifest import Manifest
from vmm.model.workdir import SharedFiles, create_workdir
from vmm.vms.reconcile import stamp, update_left
from vmm.vms.update import JOURNAL, stage_update


def manifest() -> Manifest:
    return Manifest(id="vm-1", name="a", app_id="ab" * 20, image="img", vcpu=1, memory=64,
                    disk_size=1, created_at_ms=1)


def test_the_stamp_changes_with_every_kind_of_write(tmp_path: Path) -> None:
    """Equal while untouched; changed by an atomic replace, an in-place same-size edit, a new
    optional file, and a journal appearing."""
    wd = create_workdir(tmp_path, manifest(), SharedFiles(compose="{}"), started=False)
    first = stamp(wd)
    assert first is not None and first == stamp(wd)
    wd.write_desired(type(wd.read_desired())(started=False))  # same bytes, new inode
    second = stamp(wd)
    assert second != first
    with wd.compose.open("r+b") as fp:  # in place, same size: only the times tell
        fp.write(b"[]")
    os.utime(wd.compose, ns=(1, 1))  # even with the mtime put back, ctime moved
    third = stamp(wd)
    assert third != second
    wd.user_config.write_text("u")
    fourth = stamp(wd)
    assert fourth != third
    (wd.path / JOURNAL).write_text("{}")
    assert stamp(wd) != fourth


def test_update_left_sees_journals_and_staged_files(tmp_path: Path) -> None:
    """The start-up probe finds what ``finish_pending`` would act on, and nothing else."""
    wd = create_workdir(tmp_path, manifest(), SharedFiles(compose="{}"), started=False)
    assert not update_left(str(wd.path))
    staged = stage_update(wd, manifest().evolve(vcpu=2), SharedFiles(compose='{"v": 2}'))
    assert update_left(str(wd.path))  # staged files, no journal: leftovers to discard
    for name in staged.install:
        path = wd.path / name
        (path.parent / f".{path.name}.update").unlink(missing_ok=True)
    assert not update_left(str(wd.path))
    (wd.path / JOURNAL).write_text("{}")
    assert update_left(str(wd.path))
