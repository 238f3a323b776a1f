"""Unpack a pulled guest image: layer tarballs into a staging directory, then into place.

A pull works in ``<images>/.pull-<tag>/`` (the staging area): blobs in ``blobs/``, the image
tree in ``dstack-<tag>/``. Every tar member is checked before anything is written: a relative
path without ``..`` that does not pass through a symlink, a regular file, directory or link whose
target stays inside the tree (no devices, FIFOs or sockets), and bounded sizes. Only when that
tree holds a loadable image (``images.load_image``: metadata.json parses and names files that
exist) is it moved to ``<images>/dstack-<tag>``; a rename on one file system is atomic, so a
half image is never visible under its final name. The daemon deletes stale staging areas
at start, which covers a pull cut short by a restart.
"""

from __future__ import annotations

import errno
import io
import os
import posixpath
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from vmm.core.exceptions import BadRequest, Conflict, InvalidField, NotFound
from vmm.core.names import IMAGE_NAME, check_name
from vmm.model.images import ImageError, load_image

STAGING_PREFIX = ".pull-"
LOCAL_PREFIX = "dstack-"
COPY_CHUNK = 1 << 20
# dstack-<tag> must itself be a valid image name.
MAX_TAG_LEN = IMAGE_NAME.max_len - len(LOCAL_PREFIX)


class UnpackError(BadRequest):
    """A layer cannot be unpacked safely; the message names the member and the reason."""

    code = "BAD_IMAGE_LAYER"


@dataclass(frozen=True)
class Limits:
    """Bounds on what a layer may hold: the whole tree, one file, and the member count."""

    total_bytes: int = 64 << 30
    file_bytes: int = 32 << 30
    members: int = 10_000


def check_tag(tag: str, field: str = "tag") -> str:
    """A registry tag that can become ``dstack-<tag>``: the image-name rule, no path characters."""
    check_name(tag, field, IMAGE_NAME)
    if len(tag) > MAX_TAG_LEN:
        raise InvalidField(field, f"{tag!r} is longer than {MAX_TAG_LEN} characters")
    return tag


def local_name(tag: str) -> str:
    return LOCAL_PREFIX + tag


def staging_dir(images_dir: Path, tag: str) -> Path:
    return images_dir / f"{STAGING_PREFIX}{tag}"


def clean_stale_staging(images_dir: Path) -> list[str]:
    """Delete every staging area left by an interrupted pull; return their names."""
    try:
        stale = [p for p in images_dir.iterdir() if p.name.startswith(STAGING_PREFIX)]
    except FileNotFoundError:
        return []
    for path in stale:
        if path.is_symlink() or not path.is_dir():
            path.unlink()
        else:
            shutil.rmtree(path)
    return sorted(p.name for p in stale)


class _Budget:
    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.bytes = 0
        self.members = 0

    def take(self, member: tarfile.TarInfo, layer: str) -> None:
        self.members += 1
        if self.members > self.limits.members:
            raise UnpackError(f"layer {layer}: more than {self.limits.members} members")
        if member.size > self.limits.file_bytes:
            raise UnpackError(f"layer {layer}: {member.name!r} is {member.size} bytes, over the "
                              f"{self.limits.file_bytes}-byte limit for one file")
        self.bytes += member.size
        if self.bytes > self.limits.total_bytes:
            raise UnpackError(f"layer {layer}: the image is over {self.limits.total_bytes} bytes")


def _relative(name: str, layer: str, what: str = "") -> str:
    """The member path normalised, or UnpackError when it is absolute or climbs out."""
    label = what or f"member {name!r}"
    if not name or "\0" in name:
        raise UnpackError(f"layer {layer}: {label} has an empty or NUL path")
    if name.startswith("/"):
        raise UnpackError(f"layer {layer}: {label} is an absolute path")
    if ".." in name.split("/"):
        raise UnpackError(f"layer {layer}: {label} contains '..'")
    return posixpath.normpath(name)


def _inside(root: Path, rel: str, layer: str, name: str) -> Path:
    """``root/rel`` after checking that no existing parent on the way is a symlink."""
    path = root
    parts = rel.split("/")
    for part in parts[:-1]:
        path = path / part
        if path.is_symlink():
            raise UnpackError(f"layer {layer}: member {name!r} goes through the symlink "
                              f"{part!r}")
    return root / rel


def _remove_existing(path: Path) -> None:
    """Later layers replace earlier entries (directories merge, as in overlay images)."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists() and not path.is_dir():
        raise UnpackError(f"cannot replace special file {path.name!r}")


def extract_layer(tarball: Path, root: Path, layer: str, budget: _Budget) -> None:
    """Extract one (optionally gzip-compressed) layer tarball into ``root``, member by member."""
    try:
        with tarfile.open(tarball, mode="r:*") as archive:
            for member in archive:
                _extract_member(archive, member, root, layer, budget)
    except tarfile.TarError as exc:
        raise UnpackError(f"layer {layer}: not a valid tar archive: {exc}") from None
    except (EOFError, OSError) as exc:  # truncated gzip, zlib errors surface as these
        if isinstance(exc, UnpackError):
            raise
        raise UnpackError(f"layer {layer}: cannot read: {exc}") from None


def _extract_member(archive: tarfile.TarFile, member: tarfile.TarInfo, root: Path,
                    layer: str, budget: _Budget) -> None:
    budget.take(member, layer)
    rel = _relative(member.name, layer)
    if rel == ".":
        return
    base = posixpath.basename(rel)
    if base.startswith(".wh."):  # an OCI whiteout: the entry is deleted by this layer
        if base != ".wh..wh..opq":
            target = _inside(root, posixpath.join(posixpath.dirname(rel), base[4:]), layer, rel)
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.is_symlink() or target.exists():
                target.unlink()
        return
    path = _inside(root, rel, layer, member.name)
    if member.isdir():
        if path.is_symlink() or (path.exists() and not path.is_dir()):
            path.unlink()
        path.mkdir(mode=0o755, exist_ok=True)
    elif member.isreg():
        _remove_existing(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("xb") as out:  # "x": never follows a link planted at the path
            _copy_content(archive, member, out, layer)
        path.chmod(0o755 if member.mode & 0o111 else 0o644)
    elif member.issym():
        link = member.linkname
        if link.startswith("/"):
            raise UnpackError(f"layer {layer}: symlink {member.name!r} points to the absolute "
                              f"path {link!r}")
        joined = posixpath.normpath(posixpath.join(posixpath.dirname(rel), link))
        if joined == ".." or joined.startswith("../"):
            raise UnpackError(f"layer {layer}: symlink {member.name!r} points outside the "
                              f"image ({link!r})")
        _remove_existing(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.symlink_to(link)
    elif member.islnk():
        source_rel = _relative(member.linkname, layer, f"hard link {member.name!r}")
        source = _inside(root, source_rel, layer, member.linkname)
        if source.is_symlink() or not source.is_file():
            raise UnpackError(f"layer {layer}: hard link {member.name!r} names "
                              f"{member.linkname!r}, which is not a file of the image")
        _remove_existing(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        os.link(source, path)
    else:
        kind = "FIFO" if member.isfifo() else "device" if member.isdev() else "special file"
        raise UnpackError(f"layer {layer}: member {member.name!r} is a {kind}; "
                          "an image holds only files, directories and links")


DEFAULT_LIMITS = Limits()


def _copy_content(archive: tarfile.TarFile, member: tarfile.TarInfo, out: BinaryIO,
                  layer: str) -> None:
    """Copy a member's bytes: in the kernel from an uncompressed layer, else through Python."""
    raw = archive.fileobj
    if isinstance(raw, io.BufferedReader) and not member.issparse():
        offset, left = member.offset_data, member.size
        try:
            while left:
                copied = os.copy_file_range(raw.fileno(), out.fileno(), left,
                                            offset_src=offset)
                if copied == 0:
                    raise UnpackError(f"layer {layer}: {member.name!r} is cut short")
                offset, left = offset + copied, left - copied
            return
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            out.seek(0)
            out.truncate()
    content = archive.extractfile(member)
    assert content is not None  # a regular file always has content
    with content:
        shutil.copyfileobj(content, out, COPY_CHUNK)


def unpack_layers(layers: list[tuple[str, Path]], root: Path,
                  limits: Limits = DEFAULT_LIMITS) -> None:
    """Extract ``(digest, tarball)`` pairs in order into ``root`` (created empty)."""
    root.mkdir()
    budget = _Budget(limits)
    for digest, tarball in layers:
        extract_layer(tarball, root, digest, budget)
    _check_links_stay_inside(root)


def _check_links_stay_inside(root: Path) -> None:
    """Each link was checked on its own; a chain of links can still climb out, so resolve all."""
    top = Path(os.path.realpath(root))
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            # realpath, unlike Path.resolve, never raises on a loop
            if path.is_symlink() and not Path(os.path.realpath(path)).is_relative_to(top):
                raise UnpackError(f"symlink {str(path.relative_to(root))!r} resolves outside "
                                  "the image")


def install(images_dir: Path, staging: Path, tag: str) -> Path:
    """Check ``staging/dstack-<tag>`` is a loadable image, then move it up into the images dir."""
    name = local_name(tag)
    try:
        load_image(staging, name)
    except (ImageError, NotFound, InvalidField) as exc:
        raise UnpackError(f"the pulled image is not a valid guest image: {exc.message}") from None
    final = images_dir / name
    if final.exists() or final.is_symlink():
        raise Conflict(f"image {name!r} already exists; delete it first")
    (staging / name).rename(final)
    return final
