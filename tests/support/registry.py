"""A real Distribution v2 registry (Debian's ``docker-registry``) for tests and benchmarks.

``registry_server`` starts it on a loopback port with a throwaway storage directory and its own
config file, over TLS from a test CA (or plain http), optionally behind token auth served by
``token_server`` (a small JWT issuer written for the tests), and ends it by PID. ``push_image``
uploads blobs and a manifest through the registry's HTTP API, as ``docker push`` would.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import hashlib
import http.server
import io
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tarfile
import threading
import time
import urllib.parse
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

REGISTRY_BIN = "/usr/bin/docker-registry"
START_TIMEOUT = 30.0
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"


@dataclass(frozen=True)
class TestCa:
    """A CA and a server certificate it signed for 127.0.0.1; PEM files in ``directory``."""

    ca_file: Path
    cert_file: Path
    key_file: Path


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: str,
          issuer_key: ec.EllipticCurvePrivateKey, *, ca: bool) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject)).issuer_name(_name(issuer))
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
            critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_test_ca(directory: Path) -> TestCa:
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = _cert("vmm test CA", ca_key, "vmm test CA", ca_key, ca=True)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _cert("127.0.0.1", key, "vmm test CA", ca_key, ca=False)
    paths = TestCa(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    paths.ca_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    paths.cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths.key_file.write_bytes(_pem_key(key))
    return paths


# -- token auth -------------------------------------------------------------------------------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenIssuer:
    """Signs ES256 JWTs the registry accepts: the signing certificate rides in ``x5c`` and is
    the registry's ``rootcertbundle``. Grants whatever scope is asked, to anyone."""

    def __init__(self, directory: Path, service: str = "registry",
                 issuer: str = "vmm-test-issuer") -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.cert = _cert("token signer", self.key, "token signer", self.key, ca=True)
        self.bundle = directory / "token-signer.pem"
        self.bundle.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        self.service = service
        self.issuer = issuer
        self.issued = 0

    def token(self, scopes: list[str]) -> str:
        access = []
        for scope in scopes:
            kind, name, actions = scope.split(":", 2) if scope.count(":") >= 2 else ("", "", "")
            if kind:
                access.append({"type": kind, "name": name, "actions": actions.split(",")})
        now = int(time.time())
        header = {"typ": "JWT", "alg": "ES256", "x5c": [
            base64.b64encode(self.cert.public_bytes(serialization.Encoding.DER)).decode()]}
        claims = {"iss": self.issuer, "sub": "", "aud": self.service, "exp": now + 600,
                  "nbf": now - 60, "iat": now, "jti": os.urandom(8).hex(), "access": access}
        signing_input = f"{_b64url(json.dumps(header).encode())}." \
                        f"{_b64url(json.dumps(claims).encode())}"
        der = self.key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)
        self.issued += 1
        return f"{signing_input}.{_b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


@contextlib.contextmanager
def token_server(issuer: TokenIssuer) -> Iterator[str]:
    """Serve ``GET /token?service=..&scope=..`` on a loopback port; yield the realm URL."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
            if query.get("service") != [issuer.service]:
                self.send_error(400, "wrong service")
                return
            body = json.dumps({"token": issuer.token(query.get("scope", []))}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/token"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


# -- the registry process ---------------------------------------------------------------------


@dataclass
class Registry:
    proc: subprocess.Popen[bytes]
    port: int
    storage: Path
    ca: TestCa | None
    repository: str
    log_path: Path
    token_realm: str = ""
    token_cache: str = field(default="", repr=False)

    @property
    def netloc(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def ref(self) -> str:
        """The ``[image] registry`` value naming this registry's repository."""
        return f"{self.netloc}/{self.repository}"

    @property
    def base_url(self) -> str:
        return f"{'https' if self.ca else 'http'}://{self.netloc}"

    def client(self) -> httpx.Client:
        verify: ssl.SSLContext | bool = (
            ssl.create_default_context(cafile=str(self.ca.ca_file)) if self.ca else False)
        return httpx.Client(base_url=self.base_url, verify=verify, timeout=60)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=15)

    def blob_data_path(self, digest: str) -> Path:
        """Where the filesystem driver keeps a blob's bytes (to corrupt it behind its back)."""
        hexdigest = digest.removeprefix("sha256:")
        return (self.storage / "docker/registry/v2/blobs/sha256" / hexdigest[:2] / hexdigest
                / "data")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _config_yaml(storage: Path, port: int, ca: TestCa | None, auth: str) -> str:
    # JSON is YAML: the registry reads this file as its config.
    config: dict[str, Any] = {
        "version": 0.1,
        "log": {"level": "warn", "accesslog": {"disabled": True}},
        "storage": {"filesystem": {"rootdirectory": str(storage)}, "delete": {"enabled": True}},
        "http": {"addr": f"127.0.0.1:{port}", "secret": os.urandom(16).hex()},
    }
    if ca is not None:
        config["http"]["tls"] = {"certificate": str(ca.cert_file), "key": str(ca.key_file)}
    if auth:
        config["auth"] = json.loads(auth)
    return json.dumps(config, indent=1)


@contextlib.contextmanager
def registry_server(workdir: Path, *, tls: bool = True, token: TokenIssuer | None = None,
                    token_realm: str = "", repository: str = "guest/dstack",
                    storage: Path | None = None, port: int = 0) -> Iterator[Registry]:
    """Run docker-registry in ``workdir``; kill it by PID on exit. ``storage`` and ``port``
    reuse an earlier run's (a restart)."""
    workdir.mkdir(parents=True, exist_ok=True)
    ca = make_test_ca(workdir) if tls else None
    storage = storage or workdir / "storage"
    port = port or _free_port()
    auth = ""
    if token is not None:
        auth = json.dumps({"token": {"realm": token_realm, "service": token.service,
                                     "issuer": token.issuer,
                                     "rootcertbundle": str(token.bundle)}})
    config_path = workdir / "registry.yml"
    config_path.write_text(_config_yaml(storage, port, ca, auth))
    log_path = workdir / "registry.log"
    with log_path.open("ab") as log:
        proc = subprocess.Popen([REGISTRY_BIN, "serve", str(config_path)], stdout=log,
                                stderr=subprocess.STDOUT, cwd=workdir)
    registry = Registry(proc, port, storage, ca, repository, log_path, token_realm)
    try:
        _wait_ready(registry)
        yield registry
    finally:
        registry.kill()


def _wait_ready(registry: Registry) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if registry.proc.poll() is not None:
            raise RuntimeError(f"docker-registry exited:\n{registry.log_path.read_text()}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", registry.port),
                                                                    timeout=1):
            return
        time.sleep(0.05)
    raise TimeoutError(f"docker-registry not listening after {START_TIMEOUT}s")


# -- pushing ----------------------------------------------------------------------------------


def _auth_headers(registry: Registry, http: httpx.Client) -> dict[str, str]:
    if not registry.token_realm:
        return {}
    if not registry.token_cache:
        scope = f"repository:{registry.repository}:pull,push"
        answer = http.get(registry.token_realm, params={"service": "registry", "scope": scope})
        answer.raise_for_status()
        registry.token_cache = answer.json()["token"]
    return {"Authorization": f"Bearer {registry.token_cache}"}


def push_blob(registry: Registry, data: bytes | Path) -> tuple[str, int]:
    """Upload one blob (monolithic upload); return its digest and size."""
    if isinstance(data, Path):
        sha = hashlib.sha256()
        with data.open("rb") as fp:
            for chunk in iter(lambda: fp.read(1 << 20), b""):
                sha.update(chunk)
        digest, size = f"sha256:{sha.hexdigest()}", data.stat().st_size
    else:
        digest, size = f"sha256:{hashlib.sha256(data).hexdigest()}", len(data)
    with registry.client() as http:
        headers = _auth_headers(registry, http)
        started = http.post(f"/v2/{registry.repository}/blobs/uploads/", headers=headers)
        assert started.status_code == 202, started.text
        location = started.headers["Location"]
        location += ("&" if "?" in location else "?") + urllib.parse.urlencode({"digest": digest})
        if isinstance(data, Path):
            with data.open("rb") as fp:
                done = http.put(location, content=iter(
                    lambda: fp.read(1 << 20), b""),
                    headers={**headers, "Content-Length": str(size),
                             "Content-Type": "application/octet-stream"})
        else:
            done = http.put(location, content=data,
                            headers={**headers, "Content-Type": "application/octet-stream"})
        assert done.status_code == 201, done.text
    return digest, size


def push_manifest(registry: Registry, reference: str, manifest: dict[str, Any] | bytes,
                  media_type: str = OCI_MANIFEST) -> str:
    body = manifest if isinstance(manifest, bytes) else json.dumps(manifest).encode()
    with registry.client() as http:
        headers = {**_auth_headers(registry, http), "Content-Type": media_type}
        answer = http.put(f"/v2/{registry.repository}/manifests/{reference}", content=body,
                          headers=headers)
        assert answer.status_code == 201, answer.text
    return f"sha256:{hashlib.sha256(body).hexdigest()}"


def image_manifest(config: tuple[str, int], layers: list[tuple[str, int]],
                   layer_type: str = OCI_LAYER, *, docker: bool = False) -> dict[str, Any]:
    return {
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST if docker else OCI_MANIFEST,
        "config": {"mediaType": DOCKER_CONFIG if docker else OCI_CONFIG,
                   "digest": config[0], "size": config[1]},
        "layers": [{"mediaType": layer_type, "digest": d, "size": s} for d, s in layers],
    }


def push_image(registry: Registry, tag: str, layers: Sequence[bytes | Path], *,
               layer_type: str = OCI_LAYER, docker: bool = False) -> str:
    """Push ``layers`` (tarballs) with a minimal config as ``tag``; return the manifest digest."""
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": []}}).encode()
    config_blob = push_blob(registry, config)
    pushed = [push_blob(registry, layer) for layer in layers]
    manifest = image_manifest(config_blob, pushed, layer_type, docker=docker)
    media = DOCKER_MANIFEST if docker else OCI_MANIFEST
    return push_manifest(registry, tag, manifest, media)


def tar_of(files: dict[str, bytes], *, gzip: bool = False,
           extra: list[tarfile.TarInfo] | None = None) -> bytes:
    """A layer tarball holding ``files`` (name → content) and any hand-made ``extra`` members."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz" if gzip else "w") as archive:
        for name, content in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            info.mode = 0o644
            archive.addfile(info, io.BytesIO(content))
        for member in extra or []:
            archive.addfile(member)
    return buffer.getvalue()


SMALL_METADATA = {"kernel": "vmlinuz", "initrd": "initrd.img", "cmdline": "console=ttyS0",
                  "version": "0.5.4", "is_dev": True}


def small_image_files(marker: bytes = b"k") -> dict[str, bytes]:
    """A loadable (not bootable) guest image: metadata.json naming files that exist."""
    return {"metadata.json": json.dumps(SMALL_METADATA).encode(),
            "vmlinuz": marker * 4096, "initrd.img": b"i" * 2048}


def dev_image_tarball(image_dir: Path, dest: Path) -> Path:
    """The development image's files as one uncompressed layer tarball at ``dest``."""
    with tarfile.open(dest, "w") as archive:
        for path in sorted(image_dir.iterdir()):
            if path.is_file() and not path.name.startswith("."):
                archive.add(path, arcname=path.name)
    return dest


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
