"""A small real KMS for tests: serves GetAppEnvEncryptPubKey over HTTP on loopback.

It answers like a dstack KMS (pRPC JSON, hex bytes) with keys derived from the app id, so a test
can predict the answer and see exactly what the VMM sent. The keys are real: an X25519 key per app
(``app_private_key`` opens what a client sealed to it) signed with a secp256k1 key the way a
dstack KMS signs it (``keccak256("dstack-env-encrypt-pubkey" ":" app_id [timestamp] pubkey)``,
65-byte recoverable signatures). ``kms_peer(signing_key=...)`` makes a peer signing with another
key, the "wrong KMS" a client must refuse.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from coincurve import PrivateKey
from Crypto.Hash import keccak
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

TIMESTAMP = 1707500000
SIGNING_KEY = PrivateKey(hashlib.sha256(b"test-kms-signer").digest())
#: The signer a client should trust: the compressed public key, hex without 0x.
SIGNER = SIGNING_KEY.public_key.format(compressed=True).hex()
OTHER_SIGNING_KEY = PrivateKey(hashlib.sha256(b"some-other-kms").digest())


def app_private_key(app_id: bytes) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(hashlib.sha256(b"test-kms-x25519" + app_id).digest())


def decrypt_env(app_id: bytes, sealed: bytes) -> dict[str, object]:
    """Open ``ephemeral_pub(32) || iv(12) || ciphertext+tag`` sealed to the app's key (§9)."""
    peer = X25519PublicKey.from_public_bytes(sealed[:32])
    shared = app_private_key(app_id).exchange(peer)
    plaintext = AESGCM(shared).decrypt(sealed[32:44], sealed[44:], None)
    decoded: dict[str, object] = json.loads(plaintext)
    return decoded


def _digest(app_id: bytes, public_key: bytes, timestamp: bytes) -> bytes:
    message = b"dstack-env-encrypt-pubkey" + b":" + app_id + timestamp + public_key
    return keccak.new(digest_bits=256, data=message).digest()


def expected_answer(app_id: bytes, signing_key: PrivateKey = SIGNING_KEY) -> dict[str, object]:
    public_key = app_private_key(app_id).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    # libsecp256k1 signs deterministically (RFC 6979), so the answer is predictable.
    signature = signing_key.sign_recoverable(_digest(app_id, public_key, b""), hasher=None)
    signature_v1 = signing_key.sign_recoverable(
        _digest(app_id, public_key, TIMESTAMP.to_bytes(8, "big")), hasher=None)
    return {
        "public_key": public_key.hex(),
        "signature": signature.hex(),
        "timestamp": TIMESTAMP,
        "signature_v1": signature_v1.hex(),
    }


@dataclass
class KmsPeer:
    url: str
    requests: list[tuple[str, bytes]] = field(default_factory=list)
    fail_with: int | None = None
    signing_key: PrivateKey = SIGNING_KEY


@contextmanager
def kms_peer(signing_key: PrivateKey = SIGNING_KEY) -> Iterator[KmsPeer]:
    peer = KmsPeer(url="", signing_key=signing_key)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("content-length", "0"))
            body = self.rfile.read(length)
            peer.requests.append((self.path, body))
            if peer.fail_with is not None:
                self._reply(peer.fail_with, {"error": "kms is sealed"})
                return
            if not self.path.startswith("/prpc/GetAppEnvEncryptPubKey"):
                self._reply(400, {"error": f"Service not found: {self.path}"})
                return
            try:
                app_id = bytes.fromhex(json.loads(body)["app_id"])
            except (ValueError, KeyError, TypeError) as exc:
                self._reply(400, {"error": f"bad request: {exc}"})
                return
            self._reply(200, expected_answer(app_id, peer.signing_key))

        def _reply(self, status: int, payload: dict[str, object]) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:
            """Keep test output quiet."""

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    peer.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield peer
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
