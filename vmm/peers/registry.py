"""A Docker Registry HTTP API v2 client: the tags of a repository, an image's layers, its blobs.

Only what pulling a guest image needs: ``tags/list``, a manifest (OCI or Docker, single image or
an index from which the linux/amd64 entry is taken) and blobs streamed to a file whose sha256 is
checked before the caller sees it. A registry that answers 401 with a ``Bearer`` challenge gets
an anonymous token from the realm it names (Distribution's token flow), once per scope.

Synchronous on purpose: the daemon runs a pull in a worker thread, where a blocking client that
writes straight to disk is simpler and faster than an async one. Every failure is a
RegistryError whose message says which request failed and why.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import queue
import re
import ssl
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from vmm.core.config import RegistryRef
from vmm.core.exceptions import RegistryError

TIMEOUT = httpx.Timeout(30.0, connect=5.0)
CHUNK = 256 << 10
MAX_MANIFEST_BYTES = 4 << 20  # Distribution itself refuses manifests over 4 MiB
MAX_TAGS_PAGES = 100

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
ACCEPT = ", ".join((*MANIFEST_TYPES, *INDEX_TYPES))

_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_CHALLENGE_PARAM = re.compile(r'(\w+)="([^"]*)"')


@dataclass(frozen=True)
class Blob:
    """A content-addressed blob the manifest names: its digest, size and media type."""

    digest: str
    size: int
    media_type: str


@dataclass(frozen=True)
class ImageManifest:
    digest: str
    config: Blob
    layers: tuple[Blob, ...]

    @property
    def total_bytes(self) -> int:
        return sum(layer.size for layer in self.layers)


class Cancelled(RegistryError):
    """The daemon is stopping: a download gave up between two chunks."""


class RegistryClient:
    def __init__(self, ref: RegistryRef, *, ca_file: str = "", plain_http: bool = False,
                 timeout: httpx.Timeout = TIMEOUT) -> None:
        self.ref = ref
        scheme = "http" if plain_http else "https"
        self.base = f"{scheme}://{ref.netloc}/v2/{ref.repository}"
        verify: ssl.SSLContext | bool = (
            ssl.create_default_context(cafile=ca_file) if ca_file else True)
        # The token realm may live on another host: the same client (and trust) reaches it.
        self._http = httpx.Client(timeout=timeout, verify=verify, follow_redirects=True)
        self._token: str | None = None
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return f"{self.ref.netloc}/{self.ref.repository}"

    def close(self) -> None:
        self._http.close()

    # -- the three reads ------------------------------------------------------------------------

    def list_tags(self) -> list[str]:
        """Every tag of the repository, in the registry's order, following ``Link`` pages."""
        tags: list[str] = []
        url: str | None = f"{self.base}/tags/list"
        for _ in range(MAX_TAGS_PAGES):
            if url is None:
                return tags
            response = self._get(url, what="tags/list")
            body = _json_object(response, "tags/list")
            page = body.get("tags") or []
            if not isinstance(page, list) or not all(isinstance(t, str) for t in page):
                raise RegistryError(f"registry {self.name}: tags/list `tags` is not a string list")
            tags.extend(page)
            url = _next_link(response)
        raise RegistryError(f"registry {self.name}: tags/list has more than {MAX_TAGS_PAGES} pages")

    def image_manifest(self, tag: str) -> ImageManifest:
        """The manifest of ``tag``; from an index, the linux/amd64 image's manifest."""
        data, media_type, digest = self._manifest(tag, expected_digest=None)
        if media_type in INDEX_TYPES or "manifests" in data:
            entry = _amd64_entry(data, self.name, tag)
            data, media_type, digest = self._manifest(entry, expected_digest=entry)
        return _image_manifest(data, media_type, digest, f"{self.name}:{tag}")

    def download_blob(self, blob: Blob, dest: Path, on_bytes: Callable[[int], None],
                      cancelled: threading.Event | None = None) -> None:
        """Stream ``blob`` into ``dest``; its size and sha256 are checked before this returns.

        ``on_bytes`` is told how many bytes each chunk added. A blob that does not match its
        digest is deleted and the error names the digest: a corrupt layer is never extracted.
        """
        url = f"{self.base}/blobs/{blob.digest}"
        sha = hashlib.sha256()
        written = 0
        try:
            # identity: the digest is of the stored bytes, which a compressing proxy would alter
            with self._stream(url, what=f"blob {blob.digest[:19]}",
                              headers={"Accept-Encoding": "identity"}) as response, \
                    _FileWriter(dest) as out:
                for chunk in response.iter_raw(CHUNK):
                    if cancelled is not None and cancelled.is_set():
                        raise Cancelled(f"pull of blob {blob.digest} cancelled")
                    written += len(chunk)
                    if written > blob.size:
                        raise RegistryError(
                            f"blob {blob.digest}: the registry sent more than the "
                            f"{blob.size} bytes the manifest declares")
                    out.write(chunk)
                    sha.update(chunk)  # releases the GIL: hashes while the writer writes
                    on_bytes(len(chunk))
        except httpx.HTTPError as exc:
            dest.unlink(missing_ok=True)
            raise RegistryError(
                f"blob {blob.digest}: download from {self.name} failed after {written} of "
                f"{blob.size} bytes: {_describe(exc)}") from None
        except BaseException:
            dest.unlink(missing_ok=True)
            raise
        actual = f"sha256:{sha.hexdigest()}"
        if written != blob.size or actual != blob.digest:
            dest.unlink(missing_ok=True)
            raise RegistryError(
                f"blob {blob.digest}: content does not match its digest "
                f"(got {written} bytes with {actual})")

    # -- plumbing -------------------------------------------------------------------------------

    def _manifest(self, reference: str, expected_digest: str | None
                  ) -> tuple[dict[str, Any], str, str]:
        what = f"manifest {reference}"
        response = self._get(f"{self.base}/manifests/{reference}", what=what,
                             headers={"Accept": ACCEPT}, limit=MAX_MANIFEST_BYTES)
        digest = f"sha256:{hashlib.sha256(response.content).hexdigest()}"
        # The registry's header claims a digest; the body must hash to it, and to the one we
        # asked for when we asked by digest (an index entry).
        for claimed in (response.headers.get("Docker-Content-Digest"), expected_digest):
            if claimed and claimed.startswith("sha256:") and claimed != digest:
                raise RegistryError(
                    f"{what} from {self.name}: body hashes to {digest}, not {claimed}")
        data = _json_object(response, what)
        media_type = data.get("mediaType") or response.headers.get("Content-Type", "")
        if not isinstance(media_type, str):
            raise RegistryError(f"{what}: `mediaType` is not a string")
        media_type = media_type.split(";")[0].strip()
        return data, media_type, digest

    def _get(self, url: str, *, what: str, headers: dict[str, str] | None = None,
             limit: int = MAX_MANIFEST_BYTES) -> httpx.Response:
        with self._stream(url, what=what, headers=headers) as response:
            body = bytearray()
            try:
                for chunk in response.iter_bytes():
                    body += chunk
                    if len(body) > limit:
                        raise RegistryError(f"{what} from {self.name}: over {limit} bytes")
            except httpx.HTTPError as exc:
                raise RegistryError(f"{what} from {self.name}: {_describe(exc)}") from None
        return httpx.Response(response.status_code, headers=response.headers,
                              content=bytes(body), request=response.request)

    @contextlib.contextmanager
    def _stream(self, url: str, *, what: str,
                headers: dict[str, str] | None = None) -> Iterator[httpx.Response]:
        response = self._open(url, what, headers or {})
        try:
            yield response
        finally:
            response.close()

    def _open(self, url: str, what: str, headers: dict[str, str]) -> httpx.Response:
        """Send the GET, answering one Bearer challenge; a non-2xx answer is a RegistryError."""
        for attempt in range(2):
            with self._lock:
                token = self._token
            sent = dict(headers)
            if token:
                sent["Authorization"] = f"Bearer {token}"
            try:
                response = self._http.send(self._http.build_request("GET", url, headers=sent),
                                           stream=True)
            except httpx.HTTPError as exc:
                raise RegistryError(f"{what}: registry {self.name} unreachable: "
                                    f"{_describe(exc)}") from None
            if response.status_code == 401 and attempt == 0:
                challenge = response.headers.get("WWW-Authenticate", "")
                response.close()
                self._authenticate(challenge, what)
                continue
            if response.status_code // 100 != 2:
                text = response.read()[:300].decode(errors="replace")
                response.close()
                raise RegistryError(
                    f"{what}: registry {self.name} answered HTTP {response.status_code}: "
                    f"{_registry_error(text)}")
            return response
        raise AssertionError("unreachable")

    def _authenticate(self, challenge: str, what: str) -> None:
        scheme, _, params_text = challenge.partition(" ")
        if scheme.lower() != "bearer":
            raise RegistryError(f"{what}: registry {self.name} wants {scheme or 'unknown'!s} "
                                "authentication; only anonymous Bearer tokens are supported")
        params = dict(_CHALLENGE_PARAM.findall(params_text))
        realm = params.pop("realm", "")
        if not realm.startswith(("https://", "http://")):
            raise RegistryError(f"{what}: registry {self.name} sent no usable token realm")
        try:
            response = self._http.get(realm, params=params)
        except httpx.HTTPError as exc:
            raise RegistryError(f"token server {realm} unreachable: {_describe(exc)}") from None
        if response.status_code != 200:
            raise RegistryError(f"token server {realm} answered HTTP {response.status_code}")
        body = _json_object(response, f"token from {realm}")
        token = body.get("token") or body.get("access_token")
        if not isinstance(token, str) or not token:
            raise RegistryError(f"token server {realm} sent no token")
        with self._lock:
            self._token = token


class _FileWriter:
    """Writes chunks to a file from a second thread, overlapping with reading and hashing.

    Taking turns instead made a blob download about half as fast as curl. An error of the
    writer (a full disk) is raised by the next ``write`` or on leaving the ``with`` block.
    """

    DEPTH = 16  # chunks in flight: bounded, so a slow disk slows the download, not memory

    def __init__(self, path: Path) -> None:
        self._file = path.open("wb")
        self._queue: queue.Queue[bytes | None] = queue.Queue(self.DEPTH)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="blob-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (chunk := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self._file.write(chunk)
                except BaseException as exc:  # kept for the reader, which raises it
                    self._error = exc

    def write(self, chunk: bytes) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put(chunk)

    def __enter__(self) -> _FileWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self._queue.put(None)
        self._thread.join()
        self._file.close()
        if self._error is not None and exc[0] is None:
            raise self._error


def _json_object(response: httpx.Response, what: str) -> dict[str, Any]:
    try:
        data = json.loads(response.content)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise RegistryError(f"{what}: the registry's answer is not JSON "
                            f"({response.content[:60]!r})") from None
    if not isinstance(data, dict):
        raise RegistryError(f"{what}: the registry's answer is not a JSON object")
    return data


def _blob(entry: object, where: str) -> Blob:
    if not isinstance(entry, dict):
        raise RegistryError(f"{where}: a descriptor is not an object")
    digest, size, media_type = entry.get("digest"), entry.get("size"), entry.get("mediaType", "")
    if not isinstance(digest, str) or not _DIGEST.match(digest):
        raise RegistryError(f"{where}: descriptor digest {digest!r} is not sha256:<64 hex>")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise RegistryError(f"{where}: descriptor {digest} has no valid size")
    if not isinstance(media_type, str):
        raise RegistryError(f"{where}: descriptor {digest} has a bad mediaType")
    return Blob(digest, size, media_type)


def _amd64_entry(index: dict[str, Any], registry: str, tag: str) -> str:
    entries = index.get("manifests")
    if not isinstance(entries, list):
        raise RegistryError(f"index {registry}:{tag}: `manifests` is not a list")
    for entry in entries:
        platform = entry.get("platform") if isinstance(entry, dict) else None
        if isinstance(platform, dict) and (platform.get("os"), platform.get("architecture")) == (
                "linux", "amd64"):
            return _blob(entry, f"index {registry}:{tag}").digest
    raise RegistryError(f"index {registry}:{tag} has no linux/amd64 image")


def _image_manifest(data: dict[str, Any], media_type: str, digest: str,
                    where: str) -> ImageManifest:
    if media_type not in MANIFEST_TYPES:
        raise RegistryError(f"manifest {where}: unsupported media type {media_type!r}")
    layers = data.get("layers")
    if not isinstance(layers, list) or not layers:
        raise RegistryError(f"manifest {where}: no layers")
    return ImageManifest(digest, _blob(data.get("config"), where),
                         tuple(_blob(layer, where) for layer in layers))


def _next_link(response: httpx.Response) -> str | None:
    link = response.headers.get("Link", "")
    match = re.match(r'<([^>]+)>\s*;\s*rel="?next"?', link)
    return str(response.url.join(match.group(1))) if match else None


def _registry_error(text: str) -> str:
    """The registry's ``errors[].message`` when it sent one, else the start of the body."""
    try:
        errors = json.loads(text).get("errors")
        return "; ".join(f"{e.get('code')}: {e.get('message')}" for e in errors)
    except (ValueError, AttributeError, TypeError):
        return text.strip()[:200] or "(empty body)"


def _describe(exc: httpx.HTTPError) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
