"""Guest images: directories holding dstack's ``metadata.json`` and the files it names.

An image directory is ``<image.path>/<name>/``. Its metadata names the kernel, initrd and
optional rootfs, hda, bios; every path is relative and must resolve to a file inside the
directory. A broken image is skipped by ListImages with a logged reason; it never fails the call.
The reason is logged once, not at every listing (the console and scripts poll ListImages), and
again only if it changes or the image is broken anew after it was mended or removed.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmm.core.exceptions import BadRequest, Conflict, InvalidField, NotFound
from vmm.core.names import IMAGE_NAME, child_of

log = logging.getLogger(__name__)

_VERSION_FROM_NAME = re.compile(r"^dstack(?:-dev)?-(\d+\.\d+\.\d+)")
MIN_VERSION = (0, 5, 0)


class ImageError(BadRequest):
    """An image directory cannot be used; the message says why."""

    code = "BAD_IMAGE"


@dataclass(frozen=True)
class Image:
    name: str
    path: Path
    metadata: dict[str, Any]
    version: str
    is_dev: bool
    shared_ro: bool
    kernel: Path
    initrd: Path
    cmdline: str
    rootfs: Path | None
    hda: Path | None
    bios: Path | None
    bios_sev: Path | None

    @property
    def description(self) -> str:
        return json.dumps(self.metadata, sort_keys=True)

    @property
    def version_tuple(self) -> tuple[int, ...]:
        return parse_version(self.version)


def image_dir(images_dir: Path, name: str, field: str = "image") -> Path:
    """``images_dir/name`` once the name passes the image rule and the path stays inside."""
    return child_of(images_dir, name, field, IMAGE_NAME)


def parse_version(text: str) -> tuple[int, ...]:
    parts = text.split("-", maxsplit=1)[0].split("+", maxsplit=1)[0].split(".")
    try:
        return tuple(int(p) for p in parts)
    except ValueError:
        raise ImageError(f"bad image version {text!r}") from None


def load_image(images_dir: Path, name: str) -> Image:
    """Load and check one image; raise NotFound or ImageError with the reason."""
    path = image_dir(images_dir, name)
    meta_path = path / "metadata.json"
    if not meta_path.is_file():
        raise NotFound(f"image not found: {name!r} (no {meta_path})")
    try:
        metadata = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ImageError(f"image {name!r}: unreadable metadata.json: {exc}") from None
    if not isinstance(metadata, dict):
        raise ImageError(f"image {name!r}: metadata.json is not a JSON object")

    def text(key: str, default: str = "") -> str:
        value = metadata.get(key, default)
        if value is None:
            return default
        if not isinstance(value, str):
            raise ImageError(f"image {name!r}: metadata `{key}` must be a string")
        return value

    def flag(key: str, default: bool) -> bool:
        value = metadata.get(key, default)
        if not isinstance(value, bool):
            raise ImageError(f"image {name!r}: metadata `{key}` must be true or false")
        return value

    def artifact(key: str, *, required: bool) -> Path | None:
        rel = text(key)
        if not rel:
            if required:
                raise ImageError(f"image {name!r}: metadata `{key}` is required")
            return None
        candidate = (path / rel).resolve()
        if Path(rel).is_absolute() or not candidate.is_relative_to(path.resolve()):
            raise ImageError(f"image {name!r}: `{key}` must be a path inside the image directory")
        if not candidate.is_file():
            raise ImageError(f"image {name!r}: `{key}` file {rel!r} does not exist")
        return candidate

    version = text("version")
    if not version:
        match = _VERSION_FROM_NAME.match(name)
        if not match:
            raise ImageError(f"image {name!r}: metadata has no `version`")
        version = match.group(1)
    if parse_version(version) < MIN_VERSION:
        raise ImageError(f"image {name!r}: unsupported image version {version} (need >= 0.5.0)")
    rootfs = artifact("rootfs", required=False)
    if rootfs is not None and rootfs.suffix == ".iso":
        raise ImageError(f"image {name!r}: an ISO rootfs is not supported for version >= 0.5.0")
    return Image(
        name=name,
        path=path,
        metadata=metadata,
        version=version,
        is_dev=flag("is_dev", False),
        shared_ro=flag("shared_ro", False),
        kernel=_required(artifact("kernel", required=True)),
        initrd=_required(artifact("initrd", required=True)),
        cmdline=text("cmdline"),
        rootfs=rootfs,
        hda=artifact("hda", required=False),
        bios=artifact("bios", required=False),
        bios_sev=artifact("bios-sev", required=False),
    )


def delete_image(
    images_dir: Path, name: str, users: Iterable[tuple[str, str]], field: str = "image"
) -> None:
    """Delete image ``name`` unless a VM uses it; ``users`` holds (image, VM name) pairs.

    A name that is a symlink to another image in the directory is an alias: only the link is
    removed, and a VM that uses either name keeps the image it points to.
    """
    path = image_dir(images_dir, name, field)
    target = os.path.realpath(path)  # realpath, unlike Path.resolve, never raises on a loop
    for image, vm_name in users:
        if image == name or os.path.realpath(images_dir / image) == target:
            raise Conflict(f"cannot delete image {name!r}: in use by VM {vm_name!r}")
    if not path.is_dir():
        raise NotFound(f"image not found: {name!r}")
    if path.is_symlink():
        path.unlink()
    else:
        shutil.rmtree(path)


class ReportedProblems:
    """What was last logged about each entry of the image directories, per directory.

    A listing logs a problem when it appears or changes, not at every poll. Listings run in
    worker threads, so the record is locked.
    """

    def __init__(self) -> None:
        self._said: dict[tuple[str, str], str] = {}  # (directory, entry) -> message
        self._lock = threading.Lock()

    def settle(self, directory: Path, problems: dict[str, str]) -> dict[str, str]:
        """Record ``directory``'s problems now (entry -> message); return those not yet said.

        An entry absent from ``problems`` is forgotten: if it breaks again, that is news.
        """
        where = str(directory)
        with self._lock:
            for key in [key for key in self._said if key[0] == where and key[1] not in problems]:
                del self._said[key]
            news = {entry: message for entry, message in problems.items()
                    if self._said.get((where, entry)) != message}
            self._said.update(((where, entry), message) for entry, message in news.items())
        return news


_REPORTED = ReportedProblems()
_UNLISTABLE = ""  # the entry under which a directory that cannot be read is recorded


def list_images(images_dir: Path, reported: ReportedProblems = _REPORTED) -> list[Image]:
    """Every loadable image, sorted by name; broken ones are skipped, each logged once."""
    try:
        # Dot-names are work areas (a pull's staging directory), never images.
        entries = sorted(p for p in images_dir.iterdir()
                         if p.is_dir() and not p.name.startswith("."))
    except FileNotFoundError:
        reported.settle(images_dir, {})
        return []
    except OSError as exc:
        for message in reported.settle(images_dir, {_UNLISTABLE: str(exc)}).values():
            log.warning("cannot list image directory %s: %s", images_dir, message)
        return []
    images = []
    problems: dict[str, str] = {}
    for entry in entries:
        try:
            images.append(load_image(images_dir, entry.name))
        except (ImageError, InvalidField, NotFound) as exc:
            # Most reasons begin by naming the image, which the log line does already.
            problems[entry.name] = exc.message.removeprefix(f"image {entry.name!r}: ")
    for name, message in reported.settle(images_dir, problems).items():
        log.warning("skipping image %r: %s", name, message)
    return images


def _required(path: Path | None) -> Path:
    assert path is not None
    return path


QCOW2_MAGIC = b"QFI\xfb"
_QCOW2_SIZE_FIELD = slice(24, 32)  # the virtual size: a big-endian u64 at byte 24 of the header


def root_disk_size(image: Image) -> int | None:
    """The virtual size in bytes of the image's root disk (hda); None when it has none.

    Read from the qcow2 header (32 bytes, no qemu-img run): hda.img is created as a qcow2
    overlay with ``backing_fmt=qcow2``, so an hda in any other format could not boot anyway.
    """
    if image.hda is None:
        return None
    try:
        with image.hda.open("rb") as disk:
            header = disk.read(_QCOW2_SIZE_FIELD.stop)
    except OSError as exc:
        raise ImageError(f"image {image.name!r}: cannot read hda: {exc.strerror}") from None
    if len(header) < _QCOW2_SIZE_FIELD.stop or not header.startswith(QCOW2_MAGIC):
        raise ImageError(f"image {image.name!r}: hda {image.hda.name!r} is not a qcow2 image")
    return int.from_bytes(header[_QCOW2_SIZE_FIELD], "big")
