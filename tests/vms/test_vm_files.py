"""One-pass reading of a new VM directory: the same stamp and content as the slow readers."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmm.model.manifest import Manifest, ManifestError
from vmm.model.workdir import SharedFiles, Workdir, create_workdir
from vmm.vms.update import JOURNAL, stage_update
from vmm.vms.vm_files import read_new, stamp


def manifest() -> Manifest:
    return Manifest(id="vm-1", name="a", app_id="ab" * 20, image="img", vcpu=1, memory=64,
                    disk_size=1, created_at_ms=1)


@pytest.mark.parametrize("shared", [
    SharedFiles(compose="{}"),
    SharedFiles(compose='{"a": 1}', encrypted_env=b"\x00\x01", user_config="u"),
])
def test_read_new_matches_stamp_and_the_workdir_readers(tmp_path: Path,
                                                        shared: SharedFiles) -> None:
    """fstat on the read descriptors gives what ``stamp`` gives; the files read are the same."""
    wd = create_workdir(tmp_path, manifest(), shared, started=True)
    found = read_new(wd)
    assert found.stamp == stamp(wd)
    assert (found.manifest, found.desired, found.shared) == (
        wd.read_manifest(), wd.read_desired(), wd.read_shared())
    assert not found.removing
    assert "vm-manifest.json" in found.names


def test_read_new_without_optional_files_and_with_a_removal_marker(tmp_path: Path) -> None:
    """No vm-state.json reads as stopped, no shared/ as empty files; .removing is reported."""
    wd = create_workdir(tmp_path, manifest(), SharedFiles(compose="{}"), started=True)
    wd.state.unlink()
    for path in wd.shared.iterdir():
        path.unlink()
    wd.shared.rmdir()
    wd.mark_removing()
    found = read_new(wd)
    assert found.stamp == stamp(wd)
    assert not found.desired.started
    assert found.shared == SharedFiles(compose="")
    assert found.removing


def test_read_new_finishes_an_interrupted_update_first(tmp_path: Path) -> None:
    """A journal left by a crash is rolled forward before the files are stamped and read."""
    wd = create_workdir(tmp_path, manifest(), SharedFiles(compose="{}"), started=False)
    stage_update(wd, manifest().evolve(vcpu=3), SharedFiles(compose='{"v": 3}')).write_journal()
    found = read_new(Workdir(wd.path))
    assert not (wd.path / JOURNAL).exists()
    assert found.manifest.vcpu == 3 and found.shared.compose == '{"v": 3}'
    assert found.stamp == stamp(wd)


def test_read_new_raises_what_the_readers_raise(tmp_path: Path) -> None:
    """No manifest is FileNotFoundError; a broken one is ManifestError (the VM is not loaded)."""
    wd = create_workdir(tmp_path, manifest(), SharedFiles(compose="{}"), started=False)
    wd.manifest.write_text("{torn")
    with pytest.raises(ManifestError):
        read_new(wd)
    wd.manifest.unlink()
    with pytest.raises(FileNotFoundError):
        read_new(wd)
