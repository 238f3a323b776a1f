"""The registry client against Debian's docker-registry (TLS from a test CA, token auth) and
against a scripted registry that answers garbage."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.registry import (
    DOCKER_LAYER,
    OCI_INDEX,
    Registry,
    TokenIssuer,
    image_manifest,
    push_image,
    push_manifest,
    registry_server,
    small_image_files,
    tar_of,
    token_server,
)
from tests.support.registry_fake import Answer, fake_registry
from tests.support.short_dirs import short_dir
from vmm.core.config import parse_registry
from vmm.core.exceptions import RegistryError
from vmm.peers.registry import Blob, RegistryClient


@pytest.fixture(scope="module")
def registry() -> Iterator[Registry]:
    with short_dir("vmmreg") as workdir, registry_server(workdir) as server:
        yield server


def client_for(registry: Registry, **kwargs: object) -> RegistryClient:
    assert registry.ca is not None
    options: dict[str, object] = {"ca_file": str(registry.ca.ca_file), **kwargs}
    return RegistryClient(parse_registry(registry.ref), **options)  # type: ignore[arg-type]


def test_tags_and_manifest_over_tls(registry: Registry, tmp_path: Path) -> None:
    """With the test CA, tags/list lists pushed tags and a layer downloads with its digest."""
    layer = tar_of(small_image_files())
    digest = push_image(registry, "0.5.4", [layer])
    client = client_for(registry)
    try:
        assert "0.5.4" in client.list_tags()
        manifest = client.image_manifest("0.5.4")
        assert manifest.digest == digest
        assert manifest.layers == (Blob(f"sha256:{hashlib.sha256(layer).hexdigest()}",
                                        len(layer), "application/vnd.oci.image.layer.v1.tar"),)
        counted: list[int] = []
        client.download_blob(manifest.layers[0], tmp_path / "layer", counted.append)
        assert (tmp_path / "layer").read_bytes() == layer
        assert sum(counted) == len(layer)
    finally:
        client.close()


def test_untrusted_certificate_is_refused(registry: Registry) -> None:
    """Without the CA file the registry's certificate is not trusted, and the error says so."""
    client = RegistryClient(parse_registry(registry.ref))
    try:
        with pytest.raises(RegistryError, match=r"unreachable: .*CERTIFICATE_VERIFY_FAILED"):
            client.list_tags()
    finally:
        client.close()


def test_docker_media_types_and_index(registry: Registry) -> None:
    """Docker v2 manifests are read, and from an OCI index the linux/amd64 entry is taken."""
    amd64 = push_image(registry, "amd64-only", [tar_of(small_image_files(b"a"), gzip=True)],
                       layer_type=DOCKER_LAYER, docker=True)
    arm64 = push_image(registry, "arm64-only", [tar_of(small_image_files(b"b"))])
    entries: list[dict[str, Any]] = [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": arm64,
         "platform": {"os": "linux", "architecture": "arm64"}, "ref": "arm64-only"},
        {"mediaType": "application/vnd.docker.distribution.manifest.v2+json", "digest": amd64,
         "platform": {"os": "linux", "architecture": "amd64"}, "ref": "amd64-only"},
    ]
    for entry in entries:
        with registry.client() as http:
            entry["size"] = len(http.get(
                f"/v2/{registry.repository}/manifests/{entry.pop('ref')}",
                headers={"Accept": entry["mediaType"]}).content)
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}
    push_manifest(registry, "multi", index, OCI_INDEX)
    client = client_for(registry)
    try:
        manifest = client.image_manifest("multi")
        assert manifest.digest == amd64
        assert manifest.layers[0].media_type == DOCKER_LAYER
    finally:
        client.close()


def test_corrupted_blob_is_refused_and_deleted(registry: Registry, tmp_path: Path) -> None:
    """A blob whose bytes no longer match its digest fails naming the digest; no file is left."""
    layer = os.urandom(300_000)
    push_image(registry, "corrupt", [layer])
    client = client_for(registry)
    try:
        blob = client.image_manifest("corrupt").layers[0]
        data = registry.blob_data_path(blob.digest)
        data.write_bytes(layer[:-1] + bytes([layer[-1] ^ 1]))  # same size, one bit flipped
        with pytest.raises(RegistryError, match=f"blob {blob.digest}: content does not match"):
            client.download_blob(blob, tmp_path / "layer", lambda n: None)
        assert list(tmp_path.iterdir()) == []
    finally:
        client.close()


def test_registry_killed_mid_download(tmp_path: Path) -> None:
    """A registry that dies during a blob fails the download cleanly, naming how far it got."""
    with short_dir("vmmreg") as workdir, registry_server(workdir, tls=False) as server:
        layer = os.urandom(64 << 20)
        push_image(server, "big", [layer])
        client = RegistryClient(parse_registry(server.ref), plain_http=True)
        try:
            blob = client.image_manifest("big").layers[0]
            received = [0]

            def kill_at_first_chunk(count: int) -> None:
                received[0] += count
                if server.proc.poll() is None:
                    server.kill()

            with pytest.raises(RegistryError, match=r"download from .* failed after \d+ of "
                                                    f"{len(layer)} bytes"):
                client.download_blob(blob, tmp_path / "layer", kill_at_first_chunk)
            assert 0 < received[0] < len(layer)
            assert list(tmp_path.iterdir()) == []
        finally:
            client.close()


def test_token_auth_challenge_is_followed(tmp_path: Path) -> None:
    """A registry behind token auth answers 401; the client fetches a token and is let in."""
    with short_dir("vmmtok") as workdir:
        issuer = TokenIssuer(workdir)
        with token_server(issuer) as realm, \
                registry_server(workdir, token=issuer, token_realm=realm) as server:
            push_image(server, "0.5.4", [tar_of(small_image_files())])
            pushed_with = issuer.issued
            with server.client() as http:
                assert http.get(f"/v2/{server.repository}/tags/list").status_code == 401
            client = client_for(server)
            try:
                assert client.list_tags() == ["0.5.4"]
                layer = client.image_manifest("0.5.4").layers[0]
                client.download_blob(layer, tmp_path / "layer", lambda n: None)
            finally:
                client.close()
            assert issuer.issued == pushed_with + 1  # one token, reused for every request


def test_registry_down_is_unreachable() -> None:
    """Nothing listening: the error names the registry and says it is unreachable."""
    with fake_registry({}) as fake:
        ref = fake.ref
    client = RegistryClient(parse_registry(ref), plain_http=True)
    try:
        with pytest.raises(RegistryError, match=f"tags/list: registry {ref} unreachable"):
            client.list_tags()
    finally:
        client.close()


def _manifest_body() -> bytes:
    config = ("sha256:" + "1" * 64, 2)
    return json.dumps(image_manifest(config, [("sha256:" + "2" * 64, 10)])).encode()


@pytest.mark.parametrize(("routes", "call", "reason"), [
    ({"/v2/guest/dstack/tags/list": Answer(200, b"<html>hello</html>")}, "tags",
     "tags/list: the registry's answer is not JSON"),
    ({"/v2/guest/dstack/tags/list": Answer(200, b'{"tags": [1, 2]}')}, "tags",
     "`tags` is not a string list"),
    ({"/v2/guest/dstack/tags/list": Answer(500, b'{"errors": [{"code": "X", "message": "m"}]}')},
     "tags", "answered HTTP 500: X: m"),
    ({"/v2/guest/dstack/tags/list": Answer(401, b"", {"WWW-Authenticate": 'Basic realm="x"'})},
     "tags", "wants Basic authentication"),
    ({"/v2/guest/dstack/manifests/t": Answer(200, _manifest_body(), {
        "Docker-Content-Digest": "sha256:" + "0" * 64})}, "manifest",
     "body hashes to sha256:[0-9a-f]{64}, not sha256:0000"),
    ({"/v2/guest/dstack/manifests/t": Answer(200, json.dumps({
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"digest": "sha256:" + "1" * 64, "size": 2},
        "layers": [{"digest": "md5:x", "size": 1}]}).encode())}, "manifest",
     "descriptor digest 'md5:x' is not sha256"),
    ({"/v2/guest/dstack/manifests/t": Answer(200, json.dumps({
        "mediaType": "application/vnd.docker.distribution.manifest.v1+prettyjws",
        "layers": []}).encode())}, "manifest", "unsupported media type"),
    ({"/v2/guest/dstack/manifests/t": Answer(200, json.dumps({
        "mediaType": OCI_INDEX, "manifests": [{"digest": "sha256:" + "3" * 64, "size": 1,
                                               "platform": {"os": "linux",
                                                            "architecture": "arm64"}}],
    }).encode())}, "manifest", "has no linux/amd64 image"),
    ({"/v2/guest/dstack/manifests/t": Answer(200, b"x" * (5 << 20))}, "manifest",
     "over 4194304 bytes"),
])
def test_garbage_answers_are_clear_errors(routes: dict[str, Answer], call: str,
                                          reason: str) -> None:
    """Whatever a broken registry sends, the client raises a RegistryError saying what was
    wrong with which answer, never a crash or a hang."""
    with fake_registry(routes) as fake:
        client = RegistryClient(parse_registry(fake.ref), plain_http=True)
        try:
            with pytest.raises(RegistryError, match=reason):
                client.list_tags() if call == "tags" else client.image_manifest("t")
        finally:
            client.close()


def test_index_entry_must_hash_to_its_digest() -> None:
    """The manifest an index names by digest must hash to that digest (a swapped manifest)."""
    wanted = "sha256:" + "4" * 64
    index = json.dumps({"mediaType": OCI_INDEX, "manifests": [
        {"digest": wanted, "size": 10, "platform": {"os": "linux", "architecture": "amd64"}}]})
    routes = {"/v2/guest/dstack/manifests/t": Answer(200, index.encode()),
              f"/v2/guest/dstack/manifests/{wanted}": Answer(200, _manifest_body())}
    with fake_registry(routes) as fake:
        client = RegistryClient(parse_registry(fake.ref), plain_http=True)
        try:
            with pytest.raises(RegistryError, match=f"body hashes to .*, not {wanted}"):
                client.image_manifest("t")
        finally:
            client.close()


def test_oversized_blob_stream_is_cut(tmp_path: Path) -> None:
    """A registry sending more bytes than the manifest declares is stopped at the size."""
    digest = "sha256:" + "5" * 64
    routes = {f"/v2/guest/dstack/blobs/{digest}": Answer(200, b"y" * 5000)}
    with fake_registry(routes) as fake:
        client = RegistryClient(parse_registry(fake.ref), plain_http=True)
        try:
            with pytest.raises(RegistryError, match="more than the 100 bytes"):
                client.download_blob(Blob(digest, 100, ""), tmp_path / "b", lambda n: None,
                                     threading.Event())
            assert list(tmp_path.iterdir()) == []
        finally:
            client.close()


def test_disk_full_during_download(registry: Registry, tmp_path: Path) -> None:
    """A write error of the writer thread (ENOSPC) reaches the caller and the file is removed."""
    layer = os.urandom(2 << 20)
    push_image(registry, "disk-full", [layer])
    full = tmp_path / "layer"
    full.symlink_to("/dev/full")  # writes fail with ENOSPC; unlinking removes only the link
    client = client_for(registry)
    try:
        blob = client.image_manifest("disk-full").layers[0]
        with pytest.raises(OSError, match="No space left on device"):
            client.download_blob(blob, full, lambda n: None)
    finally:
        client.close()
    assert list(tmp_path.iterdir()) == []
    assert Path("/dev/full").exists()
