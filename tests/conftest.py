"""Shared fixtures: a real daemon subprocess with a real KMS peer and sample images."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.daemon_proc import DaemonProcess, start_daemon
from tests.support.kms_peer import KmsPeer, kms_peer
from tests.support.short_dirs import short_dir


def make_image(images: Path, name: str, metadata: dict[str, object] | str) -> Path:
    """An image directory with the files its metadata names (small placeholder files)."""
    path = images / name
    path.mkdir(parents=True)
    if isinstance(metadata, str):
        (path / "metadata.json").write_text(metadata)
        return path
    for key in ("kernel", "initrd", "rootfs", "hda", "bios"):
        value = metadata.get(key)
        if isinstance(value, str) and "/" not in value:
            (path / value).write_bytes(b"\0" * 16)
    (path / "metadata.json").write_text(json.dumps(metadata))
    return path


def populate_images(images: Path) -> None:
    make_image(
        images,
        "dstack-0.5.3",
        {"kernel": "bzImage", "initrd": "initramfs.cpio.gz", "rootfs": "rootfs.img.verity",
         "cmdline": "console=ttyS0", "version": "0.5.3", "is_dev": False, "shared_ro": True},
    )
    make_image(
        images,
        "dstack-dev-0.5.4",
        {"kernel": "bzImage", "initrd": "initramfs.cpio.gz", "cmdline": "console=ttyS0",
         "is_dev": True},
    )
    make_image(images, "broken-json", "{not json")
    make_image(images, "old-0.4.0", {"kernel": "k", "initrd": "i", "version": "0.4.0"})
    make_image(images, "escapes", {"kernel": "../../etc/passwd", "initrd": "i", "version": "0.5.0"})
    (images / "missing-kernel").mkdir()
    (images / "missing-kernel" / "metadata.json").write_text(
        json.dumps({"kernel": "nope", "initrd": "nope", "version": "0.5.0"})
    )


@pytest.fixture(scope="module")
def kms() -> Iterator[KmsPeer]:
    with kms_peer() as peer:
        yield peer


@pytest.fixture(scope="module")
def short_tmp() -> Iterator[Path]:
    """A short temp dir: Unix socket paths are limited to 108 bytes."""
    with short_dir("vmmt") as path:
        yield path


@pytest.fixture(scope="module")
def daemon(short_tmp: Path, kms: KmsPeer) -> Iterator[DaemonProcess]:
    """One real daemon per test module, on a TCP port and a Unix socket."""
    populate_images(short_tmp / "state" / "images")
    proc = start_daemon(
        short_tmp,
        addresses=["tcp:127.0.0.1:0", "unix:./vmm.sock"],
        extra_config=f'kms_url = "{kms.url}"\n[cvm]\naccel = "tcg"\n',
    )
    try:
        yield proc
    finally:
        proc.destroy()
