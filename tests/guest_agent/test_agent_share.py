"""guest_agent.share: the 9p host share's tag discovery and the compose hash."""

import hashlib
from pathlib import Path

from guest_agent import share


def test_mount_tags_are_read_from_the_virtio_9p_driver(tmp_path: Path) -> None:
    """Each bound virtio 9p device's mount_tag is read, NUL and newline stripped."""
    for device, tag in (("virtio3", b"host-shared\0"), ("virtio1", b"other\n")):
        (tmp_path / device).mkdir()
        (tmp_path / device / "mount_tag").write_bytes(tag)
    (tmp_path / "virtio7").mkdir()  # no mount_tag: ignored
    assert share.read_mount_tags(tmp_path) == ["other", "host-shared"]
    assert share.read_mount_tags(tmp_path / "absent") == []


def test_absent_share_is_not_mounted(tmp_path: Path) -> None:
    """Without a device carrying the tag, mount_share reports False and mounts nothing."""
    target = tmp_path / "dstack"
    assert share.mount_share(target, "host-shared", tmp_path / "no-driver") is False
    assert not target.exists()


def test_compose_hash_is_sha256_of_the_file_or_none(tmp_path: Path) -> None:
    """compose_sha256 hashes app-compose.json bytes as they are, and is None without it."""
    assert share.compose_sha256(tmp_path) is None
    data = b'{"name": "x"}\n'
    (tmp_path / "app-compose.json").write_bytes(data)
    assert share.compose_sha256(tmp_path) == hashlib.sha256(data).hexdigest()


def test_is_mounted_reads_proc_mounts(tmp_path: Path) -> None:
    """A mount point counts as mounted when /proc/mounts lists it exactly."""
    mounts = tmp_path / "mounts"
    mounts.write_text("host-shared /dstack 9p ro 0 0\nproc /proc proc rw 0 0\n")
    assert share.is_mounted(Path("/dstack"), mounts)
    assert not share.is_mounted(Path("/dst"), mounts)
    assert not share.is_mounted(Path("/dstack"), tmp_path / "missing")
