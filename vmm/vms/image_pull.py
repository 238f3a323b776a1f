"""Background pulls of guest images from the configured registry, one per tag at a time.

``ImagePulls.start(tag)`` checks the tag and returns at once; a worker thread downloads the
layers (``peers.registry``: digests verified) into the tag's staging area and unpacks them
(``model.image_unpack``: every member checked), and the image appears as ``dstack-<tag>`` only
when it is complete and valid. A failure deletes the staging area and keeps its message for
``ListRegistryImages``; so does a pull interrupted by the daemon stopping.

Progress (bytes of layer blobs done / total) is kept per tag for the listing and passed to the
``on_progress`` callable given at construction, on the event loop, at most once per percent:
the daemon connects it to whatever publishes events.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from vmm.core.exceptions import Conflict, RegistryError, VmmError
from vmm.model import image_unpack
from vmm.model.image_unpack import DEFAULT_LIMITS, Limits
from vmm.peers.registry import Blob, RegistryClient

log = logging.getLogger(__name__)

# Layer media types whose content is a tarball that tarfile reads (plain or gzip).
_TAR_TYPES = ("tar", "tar+gzip", "tar.gzip")


@dataclass(frozen=True)
class PullProgress:
    """One pull's state: ``status`` is "pulling", "done" or "failed" (then ``error`` says why)."""

    tag: str
    status: str
    bytes_done: int = 0
    bytes_total: int = 0
    error: str = ""


@dataclass(frozen=True)
class RegistryImage:
    tag: str
    local: bool
    pulling: bool
    error: str
    bytes_done: int
    bytes_total: int


ProgressCallback = Callable[[PullProgress], None]


class ImagePulls:
    def __init__(self, images_dir: Path, client: RegistryClient | None, *,
                 on_progress: ProgressCallback | None = None, limits: Limits = DEFAULT_LIMITS) -> None:
        self.images_dir = images_dir
        self.client = client
        self.on_progress = on_progress
        self.limits = limits
        self._state: dict[str, PullProgress] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._stopping = threading.Event()

    def clean_staging(self) -> None:
        """At start: no pull runs yet, so every staging area is a leftover of a cut-short one."""
        for name in image_unpack.clean_stale_staging(self.images_dir):
            log.warning("deleted %s: the staging area of an interrupted image pull", name)

    async def listing(self) -> list[RegistryImage]:
        """The registry's tags (digest-named ones dropped) plus any tag pulled since start."""
        if self.client is None:
            return []
        tags = await asyncio.to_thread(self.client.list_tags)
        shown = [t for t in tags if not t.startswith("sha256-")]
        shown += sorted(t for t in self._state if t not in shown)
        return [self.status(tag) for tag in shown]

    def status(self, tag: str) -> RegistryImage:
        """What is known of ``tag`` without asking the registry."""
        state = self._state.get(tag, PullProgress(tag, ""))
        local = (self.images_dir / image_unpack.local_name(tag)).is_dir() if _safe(tag) else False
        return RegistryImage(tag, local, state.status == "pulling", state.error,
                             state.bytes_done, state.bytes_total)

    def start(self, tag: str) -> None:
        """Start pulling ``tag`` in the background; refused while it pulls or exists locally."""
        if self.client is None:
            raise Conflict("no image registry is configured (image.registry)")
        image_unpack.check_tag(tag)
        if tag in self._tasks:
            raise Conflict(f"tag {tag!r} is already being pulled")
        if (self.images_dir / image_unpack.local_name(tag)).exists():
            raise Conflict(f"image {image_unpack.local_name(tag)!r} already exists; "
                           "delete it before pulling again")
        self._tasks[tag] = asyncio.create_task(self._run(tag, self.client))
        self._publish(PullProgress(tag, "pulling"))

    def pulling(self) -> list[str]:
        return sorted(self._tasks)

    async def wait(self, tag: str) -> None:
        """Return once ``tag`` is not pulling (its outcome is then in ``status``)."""
        task = self._tasks.get(tag)
        if task is not None:
            await asyncio.shield(task)

    async def close(self) -> None:
        """Stop every pull (between two chunks) and wait until each has cleaned up."""
        self._stopping.set()
        tasks = list(self._tasks.values())
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _run(self, tag: str, client: RegistryClient) -> None:
        loop = asyncio.get_running_loop()

        def progress(done: int, total: int) -> None:
            loop.call_soon_threadsafe(self._publish, PullProgress(tag, "pulling", done, total))

        try:
            await asyncio.to_thread(self._pull, tag, client, progress)
        except VmmError as exc:
            self._fail(tag, exc.message)
        except OSError as exc:
            self._fail(tag, f"cannot write the image: {exc.strerror or exc} "
                            f"({exc.filename or self.images_dir})")
        except Exception as exc:  # a bug: kept visible in the listing, logged with its traceback
            log.exception("pull of %s failed", tag)
            self._fail(tag, f"internal error: {type(exc).__name__}: {exc}")
        else:
            last = self._state.get(tag, PullProgress(tag, "pulling"))
            self._publish(replace(last, status="done", bytes_done=last.bytes_total))
            log.info("pulled image %s from %s", image_unpack.local_name(tag), client.name)
        finally:
            del self._tasks[tag]

    def _fail(self, tag: str, message: str) -> None:
        log.warning("pull of %s failed: %s", tag, message)
        last = self._state.get(tag, PullProgress(tag, "pulling"))
        self._publish(replace(last, status="failed", error=message))

    def _publish(self, progress: PullProgress) -> None:
        self._state[progress.tag] = progress
        if self.on_progress is not None:
            try:
                self.on_progress(progress)
            except Exception:  # a listener's bug must not break the pull
                log.exception("image pull progress listener failed")

    def _pull(self, tag: str, client: RegistryClient,
              progress: Callable[[int, int], None]) -> None:
        """The worker thread: download, verify, unpack and install; always remove staging."""
        staging = image_unpack.staging_dir(self.images_dir, tag)
        self.images_dir.mkdir(parents=True, exist_ok=True)
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir()
        try:
            manifest = client.image_manifest(tag)
            for layer in manifest.layers:
                _check_layer_type(layer)
            total = manifest.total_bytes
            if total > self.limits.total_bytes:
                raise RegistryError(f"image {tag!r} is {total} bytes, over the "
                                    f"{self.limits.total_bytes}-byte limit")
            reporter = _Reporter(total, progress)
            blobs = staging / "blobs"
            blobs.mkdir()
            tarballs = []
            for layer in manifest.layers:
                path = blobs / layer.digest.removeprefix("sha256:")
                client.download_blob(layer, path, reporter.add, self._stopping)
                tarballs.append((layer.digest, path))
            image_unpack.unpack_layers(tarballs, staging / image_unpack.local_name(tag),
                                       self.limits)
            if self._stopping.is_set():
                raise RegistryError(f"pull of {tag!r} cancelled: the daemon is stopping")
            image_unpack.install(self.images_dir, staging, tag)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


class _Reporter:
    """Counts bytes and reports at most once per percent (every chunk would flood listeners)."""

    def __init__(self, total: int, report: Callable[[int, int], None]) -> None:
        self.total = total
        self.done = 0
        self.step = max(total // 100, 1)
        self.next_at = 0
        self.report = report
        report(0, total)

    def add(self, count: int) -> None:
        self.done += count
        if self.done >= self.next_at or self.done == self.total:
            self.next_at = self.done + self.step
            self.report(self.done, self.total)


def _check_layer_type(layer: Blob) -> None:
    if layer.media_type and not layer.media_type.endswith(_TAR_TYPES):
        raise RegistryError(f"layer {layer.digest} has media type {layer.media_type!r}; "
                            "only tar and gzip-compressed tar layers are supported")


def _safe(tag: str) -> bool:
    try:
        image_unpack.check_tag(tag)
    except VmmError:
        return False
    return True
