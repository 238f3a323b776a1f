"""Background pulls (vms.image_pull) from a real registry: progress, one pull per tag, and
failures that leave nothing behind."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.registry import Registry, push_image, registry_server, small_image_files, tar_of
from tests.support.short_dirs import short_dir
from vmm.core.config import parse_registry
from vmm.core.exceptions import Conflict, InvalidField
from vmm.model.image_unpack import Limits
from vmm.model.images import load_image
from vmm.peers.registry import RegistryClient
from vmm.vms.image_pull import ImagePulls, PullProgress, RegistryImage

TIMEOUT = 60.0


@pytest.fixture(scope="module")
def registry() -> Iterator[Registry]:
    with short_dir("vmmpull") as workdir, registry_server(workdir, tls=False) as server:
        yield server


def pulls_for(registry: Registry, images: Path,
              on_progress: Callable[[PullProgress], None] | None = None) -> ImagePulls:
    client = RegistryClient(parse_registry(registry.ref), plain_http=True)
    return ImagePulls(images, client, on_progress=on_progress)


async def pull_to_end(pulls: ImagePulls, tag: str) -> RegistryImage:
    pulls.start(tag)
    async with asyncio.timeout(TIMEOUT):
        await pulls.wait(tag)
    entries = {e.tag: e for e in await pulls.listing()}
    return entries[tag]


def run(pulls: ImagePulls, tag: str) -> RegistryImage:
    async def main() -> RegistryImage:
        try:
            return await pull_to_end(pulls, tag)
        finally:
            await pulls.close()
            assert pulls.client is not None
            pulls.client.close()
    return asyncio.run(main())


def layout(tmp_path: Path) -> tuple[Path, Path]:
    """(images dir, sentinel file beside it) for checking nothing escapes."""
    images = tmp_path / "images"
    images.mkdir()
    sentinel = tmp_path / "sentinel"
    sentinel.write_text("untouched")
    return images, sentinel


def test_pull_reports_progress_and_installs(registry: Registry, tmp_path: Path) -> None:
    """A pull reports bytes done/total rising to the total, ends "done", and leaves exactly
    dstack-<tag>, loadable, with no staging area."""
    layers = [tar_of({**small_image_files(), "big.bin": os.urandom(3 << 20)}),
              tar_of({"extra.bin": os.urandom(1 << 20)}, gzip=True)]
    push_image(registry, "0.5.4-progress", layers)
    images, _ = layout(tmp_path)
    seen: list[PullProgress] = []
    entry = run(pulls_for(registry, images, seen.append), "0.5.4-progress")

    total = sum(len(layer) for layer in layers)
    assert entry == RegistryImage("0.5.4-progress", True, False, "", total, total)
    assert seen[0] == PullProgress("0.5.4-progress", "pulling")
    assert seen[-1] == PullProgress("0.5.4-progress", "done", total, total)
    done = [p.bytes_done for p in seen if p.status == "pulling"]
    assert done == sorted(done) and len(done) > 3
    assert all(p.bytes_total == total for p in seen[1:])
    assert [p.name for p in images.iterdir()] == ["dstack-0.5.4-progress"]
    assert load_image(images, "dstack-0.5.4-progress").version == "0.5.4"


def test_second_pull_of_a_tag_is_refused(registry: Registry, tmp_path: Path) -> None:
    """While a tag pulls, starting it again is a Conflict; once pulled, so is pulling it again;
    a tag with path characters is refused before anything starts."""
    push_image(registry, "twice", [tar_of({**small_image_files(), "b": os.urandom(2 << 20)})])
    images, _ = layout(tmp_path)
    refusals: list[str] = []
    pulls: ImagePulls

    def again(progress: PullProgress) -> None:
        if progress.status == "pulling" and not refusals:
            with pytest.raises(Conflict) as caught:
                pulls.start("twice")
            refusals.append(caught.value.message)

    pulls = pulls_for(registry, images, again)
    with pytest.raises(InvalidField, match=r"invalid field `tag`: '\.\./twice' contains a path"):
        pulls.start("../twice")
    assert run(pulls, "twice").local
    assert refusals == ["tag 'twice' is already being pulled"]
    with pytest.raises(Conflict, match="'dstack-twice' already exists"):
        pulls.start("twice")


@pytest.mark.parametrize(("files", "extra", "reason"), [
    ({}, [("../../escaped", tarfile.REGTYPE, "")], "member '../../escaped' contains '..'"),
    ({}, [("/tmp/escaped", tarfile.REGTYPE, "")], "'/tmp/escaped' is an absolute path"),
    ({}, [("up", tarfile.SYMTYPE, "../..")], "symlink 'up' points outside the image"),
    ({}, [("null", tarfile.CHRTYPE, "")], "member 'null' is a device"),
    ({"metadata.json": b'{"version": "0.5.4"}'}, [],
     "not a valid guest image: image 'dstack-bad-[0-9]+': metadata `kernel` is required"),
])
def test_bad_layer_fails_and_leaves_nothing(
        registry: Registry, tmp_path: Path, files: dict[str, bytes],
        extra: list[tuple[str, bytes, str]], reason: str) -> None:
    """A layer that tries to escape (or is no image) fails the pull with the member named, and
    the images directory and its parent are as before."""
    members = []
    for name, kind, link in extra:
        info = tarfile.TarInfo(name)
        info.type, info.linkname = kind, link
        members.append(info)
    tag = f"bad-{abs(hash(reason)) % 10_000}"
    push_image(registry, tag, [tar_of({**small_image_files(), **files}, extra=members)])
    images, sentinel = layout(tmp_path)
    entry = run(pulls_for(registry, images), tag)
    assert not entry.local and not entry.pulling
    assert re.search(reason, entry.error), entry.error
    assert list(images.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "sentinel"]
    assert sentinel.read_text() == "untouched"


def test_corrupted_blob_fails_the_pull(registry: Registry, tmp_path: Path) -> None:
    """A layer whose stored bytes were altered fails with its digest named; nothing is left."""
    layer = tar_of({**small_image_files(), "x": os.urandom(100_000)})
    push_image(registry, "corrupted", [layer])
    client = RegistryClient(parse_registry(registry.ref), plain_http=True)
    digest = client.image_manifest("corrupted").layers[0].digest
    client.close()
    data = registry.blob_data_path(digest)
    data.write_bytes(layer.replace(b"metadata.json", b"metadata.jsoN"))
    images, _ = layout(tmp_path)
    entry = run(pulls_for(registry, images), "corrupted")
    assert entry.error == (f"blob {digest}: content does not match its digest (got "
                           f"{len(layer)} bytes with sha256:"
                           f"{hashlib.sha256(data.read_bytes()).hexdigest()})")
    assert list(images.iterdir()) == []


def test_registry_killed_mid_pull(tmp_path: Path) -> None:
    """The registry dies after the first chunk: the pull fails naming the blob and how far it
    got, progress stops short of the total, and no staging area or image is left."""
    with short_dir("vmmkill") as workdir, registry_server(workdir, tls=False) as server:
        push_image(server, "dies", [tar_of({**small_image_files(),
                                            "big": os.urandom(64 << 20)})])
        images, _ = layout(tmp_path)

        def kill_once_started(progress: PullProgress) -> None:
            if progress.bytes_done > 0 and server.proc.poll() is None:
                server.kill()

        pulls = pulls_for(server, images, kill_once_started)

        async def main() -> RegistryImage:
            pulls.start("dies")
            async with asyncio.timeout(TIMEOUT):
                await pulls.wait("dies")
            assert pulls.client is not None
            pulls.client.close()
            return pulls.status("dies")  # the registry is dead: no listing

        entry = asyncio.run(main())
    assert not entry.local and not entry.pulling
    assert 0 < entry.bytes_done < entry.bytes_total
    assert re.fullmatch(r"blob sha256:[0-9a-f]{64}: download from 127\.0\.0\.1:\d+/guest/dstack "
                        r"failed after \d+ of \d+ bytes: \w+: .+", entry.error), entry.error
    assert list(images.iterdir()) == []


@pytest.mark.parametrize(("layer_type", "limits", "reason"), [
    ("application/vnd.oci.image.layer.v1.tar+zstd", Limits(),
     "has media type 'application/vnd.oci.image.layer.v1.tar\\+zstd'; only tar and "
     "gzip-compressed tar layers are supported"),
    ("application/vnd.oci.image.layer.v1.tar", Limits(total_bytes=1000),
     "image 'refused-early-[0-9]' is [0-9]+ bytes, over the 1000-byte limit"),
])
def test_unusable_manifest_is_refused_before_download(
        registry: Registry, tmp_path: Path, layer_type: str, limits: Limits,
        reason: str) -> None:
    """A layer type that is not tar, or an image over the size limit, fails before any blob
    is fetched."""
    tag = f"refused-early-{0 if 'zstd' in layer_type else 1}"
    push_image(registry, tag, [tar_of(small_image_files())], layer_type=layer_type)
    images, _ = layout(tmp_path)
    client = RegistryClient(parse_registry(registry.ref), plain_http=True)
    pulls = ImagePulls(images, client, limits=limits)
    entry = run(pulls, tag)
    assert re.fullmatch(f".*{reason}", entry.error), entry.error
    assert entry.bytes_done == 0
    assert list(images.iterdir()) == []
