"""Unpacking pulled layers: every tar member checked, install only of a valid image."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from vmm.core.exceptions import Conflict, InvalidField
from vmm.model import image_unpack
from vmm.model.image_unpack import Limits, UnpackError, install, unpack_layers
from vmm.model.images import list_images, load_image

METADATA = {"kernel": "vmlinuz", "initrd": "initrd.img", "version": "0.5.4"}
GOOD = {"metadata.json": json.dumps(METADATA).encode(), "vmlinuz": b"k" * 100,
        "initrd.img": b"i" * 50}


def member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "", size: int = 0
           ) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.size = size
    return info


def layer(path: Path, files: dict[str, bytes], extra: Sequence[tarfile.TarInfo] = (),
          *, gzip: bool = False) -> Path:
    with tarfile.open(path, "w:gz" if gzip else "w") as archive:
        for name, content in files.items():
            info = member(name, size=len(content))
            archive.addfile(info, io.BytesIO(content))
        for info in extra:
            archive.addfile(info, io.BytesIO(b"x" * info.size) if info.size else None)
    return path


@pytest.fixture
def area(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """(images dir, staging dir) inside a parent holding a sentinel the tests watch."""
    images = tmp_path / "images"
    images.mkdir()
    (tmp_path / "sentinel").write_text("untouched")
    staging = image_unpack.staging_dir(images, "t")
    staging.mkdir()
    yield images, staging
    assert (tmp_path / "sentinel").read_text() == "untouched"


def outside_files(tmp_path: Path, staging: Path) -> list[str]:
    """Everything under tmp_path that is neither the staging area nor a test tarball."""
    return sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")
                  if not p.is_relative_to(staging) and p.suffix != ".tar"
                  and p.name not in {"images", "sentinel"})


def test_tag_rule_refuses_path_characters() -> None:
    """A tag that could leave the images directory, or make too long a name, is refused."""
    for bad in ("", ".", "..", "../x", "a/b", "a\\b", "x" * 58, "tag with space"):
        with pytest.raises(InvalidField, match="`tag`"):
            image_unpack.check_tag(bad)
    assert image_unpack.check_tag("0.5.4-dev_1") == "0.5.4-dev_1"
    assert image_unpack.local_name("0.5.4") == "dstack-0.5.4"


def test_layers_unpack_in_order_and_install(area: tuple[Path, Path], tmp_path: Path) -> None:
    """Gzip and plain layers apply in order (later files win, whiteouts delete), then install
    renames the tree to dstack-<tag>, which loads."""
    images, staging = area
    first = layer(tmp_path / "1.tar", {**GOOD, "old.txt": b"old", "dir/a": b"a"}, gzip=True)
    second = layer(tmp_path / "2.tar", {"vmlinuz": b"new kernel", ".wh.old.txt": b""},
                   [member("dir/link", tarfile.SYMTYPE, "a"),
                    member("hard", tarfile.LNKTYPE, "dir/a")])
    unpack_layers([("one", first), ("two", second)], staging / "dstack-t")
    final = install(images, staging, "t")
    assert final == images / "dstack-t"
    assert (final / "vmlinuz").read_bytes() == b"new kernel"
    assert not (final / "old.txt").exists()
    assert (final / "dir/link").read_bytes() == b"a" and (final / "hard").read_bytes() == b"a"
    assert load_image(images, "dstack-t").kernel == (final / "vmlinuz").resolve()
    assert not (staging / "dstack-t").exists()


@pytest.mark.parametrize(("extra", "reason"), [
    ([member("/etc/evil", size=1)], "'/etc/evil' is an absolute path"),
    ([member("../evil", size=1)], "'../evil' contains '..'"),
    ([member("a/../../evil", size=1)], "contains '..'"),
    ([member("up", tarfile.SYMTYPE, "../..")], "symlink 'up' points outside the image"),
    ([member("abs", tarfile.SYMTYPE, "/etc/passwd")], "points to the absolute path"),
    ([member("d/self", tarfile.SYMTYPE, "."), member("d/esc", tarfile.SYMTYPE, "self/../..")],
     "symlink 'd/esc' resolves outside the image"),
    ([member("dir", tarfile.SYMTYPE, "."), member("dir/x", size=1)],
     "goes through the symlink 'dir'"),
    ([member("hl", tarfile.LNKTYPE, "../sentinel")], "hard link 'hl'"),
    ([member("hl", tarfile.LNKTYPE, "missing")], "not a file of the image"),
    ([member("null", tarfile.CHRTYPE)], "'null' is a device"),
    ([member("blk", tarfile.BLKTYPE)], "'blk' is a device"),
    ([member("fifo", tarfile.FIFOTYPE)], "'fifo' is a FIFO"),
])
def test_escaping_or_special_members_are_refused(
        area: tuple[Path, Path], tmp_path: Path, extra: list[tarfile.TarInfo],
        reason: str) -> None:
    """Absolute paths, '..', links out of the tree, writes through links, devices and FIFOs
    each fail with the member named, and nothing is written outside the staging area."""
    _, staging = area
    tarball = layer(tmp_path / "evil.tar", GOOD, extra)
    with pytest.raises(UnpackError) as caught:
        unpack_layers([("sha256:bad", tarball)], staging / "dstack-t")
    assert reason in caught.value.message
    # A chain of links is judged after the last layer; every other check names its layer.
    assert "layer sha256:bad: " in caught.value.message or "resolves outside" in reason
    assert outside_files(tmp_path, staging) == []


@pytest.mark.parametrize(("limits", "reason"), [
    (Limits(file_bytes=99), "'vmlinuz' is 100 bytes, over the 99-byte limit for one file"),
    (Limits(total_bytes=120), "the image is over 120 bytes"),
    (Limits(members=2), "more than 2 members"),
])
def test_size_limits(area: tuple[Path, Path], tmp_path: Path, limits: Limits,
                     reason: str) -> None:
    """A layer over the per-file, total or member-count limit is refused before it is written."""
    _, staging = area
    tarball = layer(tmp_path / "big.tar", GOOD)
    with pytest.raises(UnpackError, match=reason):
        unpack_layers([("L", tarball)], staging / "dstack-t", limits)


def test_not_a_tarball(area: tuple[Path, Path], tmp_path: Path) -> None:
    """Bytes that are no tar archive fail as such, naming the layer."""
    _, staging = area
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"\x1f\x8b this is not gzip" * 50)
    with pytest.raises(UnpackError, match=r"layer L: .*(not a valid tar|cannot read)"):
        unpack_layers([("L", junk)], staging / "dstack-t")


@pytest.mark.parametrize(("files", "reason"), [
    ({"vmlinuz": b"k"}, "no .*metadata.json"),
    ({"metadata.json": b"{not json", "vmlinuz": b"k"}, "unreadable metadata.json"),
    ({"metadata.json": json.dumps(METADATA).encode(), "vmlinuz": b"k"},
     "`initrd` file 'initrd.img' does not exist"),
])
def test_install_requires_a_valid_image(area: tuple[Path, Path], tmp_path: Path,
                                        files: dict[str, bytes], reason: str) -> None:
    """An unpacked tree is installed only when metadata.json parses and names existing files."""
    images, staging = area
    unpack_layers([("L", layer(tmp_path / "l.tar", files))], staging / "dstack-t")
    with pytest.raises(UnpackError, match=f"not a valid guest image: .*{reason}"):
        install(images, staging, "t")
    assert not (images / "dstack-t").exists()


def test_install_refuses_an_existing_image(area: tuple[Path, Path], tmp_path: Path) -> None:
    """A pulled tag never replaces an image already present under its name."""
    images, staging = area
    (images / "dstack-t").mkdir()
    unpack_layers([("L", layer(tmp_path / "l.tar", GOOD))], staging / "dstack-t")
    with pytest.raises(Conflict, match="'dstack-t' already exists"):
        install(images, staging, "t")


def test_stale_staging_is_cleaned_and_never_listed(area: tuple[Path, Path],
                                                   tmp_path: Path) -> None:
    """A staging area (even a complete-looking one) is not an image, and start deletes it."""
    images, staging = area
    unpack_layers([("L", layer(tmp_path / "l.tar", GOOD))], staging / "dstack-t")
    for name, content in GOOD.items():
        (staging / name).write_bytes(content)
    assert list_images(images) == []
    assert image_unpack.clean_stale_staging(images) == [".pull-t"]
    assert list(images.iterdir()) == []


@pytest.mark.parametrize("gzip", [False, True])
def test_truncated_layer(area: tuple[Path, Path], tmp_path: Path, gzip: bool) -> None:
    """A layer cut in the middle of a file's bytes fails; it is never taken as complete."""
    _, staging = area
    tarball = layer(tmp_path / "cut.tar", {**GOOD, "big": b"b" * 200_000}, gzip=gzip)
    tarball.write_bytes(tarball.read_bytes()[:-60_000 if not gzip else -300])
    with pytest.raises(UnpackError, match=r"layer L: .*(cut short|cannot read|not a valid tar)"):
        unpack_layers([("L", tarball)], staging / "dstack-t")
