"""Encrypted env for the guest, and the check of the KMS key it is encrypted to (reference §9).

- The plaintext is ``{"env": [{"key": k, "value": v}, ...]}`` as JSON.
- It is sealed to the KMS's X25519 public key for the app: an ephemeral X25519 key pair, the
  raw shared secret as the AES-256-GCM key, a 12-byte random IV, no associated data. The result
  is ``ephemeral_public(32) || iv(12) || ciphertext+tag``, which the guest opens.
- The KMS signs that public key with a secp256k1 key. ``signature_v1`` is a 65-byte recoverable
  signature (r || s || recovery id) over ``keccak256(b"dstack-env-encrypt-pubkey:" || app_id ||
  timestamp as 8 big-endian bytes || public_key)``; the legacy ``signature`` leaves out the
  timestamp. The signer is recovered as a compressed public key and must be one the operator
  trusts, or a host between the CLI and the KMS could hand out its own key and read the secrets.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from coincurve import PublicKey
from Crypto.Hash import keccak
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

SIGNING_PREFIX = b"dstack-env-encrypt-pubkey"
IV_LEN = 12
X25519_LEN = 32
SIGNATURE_LEN = 65
COMPRESSED_KEY_LEN = 33


class SignatureError(ValueError):
    """The KMS answer's signature is missing or malformed, or names no key."""


def keccak256(data: bytes) -> bytes:
    return keccak.new(digest_bits=256, data=data).digest()


def signed_message(app_id: bytes, public_key: bytes, timestamp: int | None) -> bytes:
    """The 32-byte digest the KMS signs (``timestamp`` None: the legacy form)."""
    stamp = b"" if timestamp is None else timestamp.to_bytes(8, "big")
    return keccak256(SIGNING_PREFIX + b":" + app_id + stamp + public_key)


def recover_signer(signature: bytes, digest: bytes) -> bytes:
    """The compressed secp256k1 public key that made ``signature`` over ``digest``."""
    if len(signature) != SIGNATURE_LEN:
        raise SignatureError(f"signature is {len(signature)} bytes, expected {SIGNATURE_LEN}")
    recovery = signature[64]
    if recovery >= 27:  # Ethereum-style v (27/28) from some signers
        recovery -= 27
    if recovery > 3:
        raise SignatureError(f"bad recovery id {signature[64]}")
    try:
        key = PublicKey.from_signature_and_message(signature[:64] + bytes([recovery]), digest,
                                                   hasher=None)
    except ValueError as exc:
        raise SignatureError(f"signature does not verify: {exc}") from None
    return bytes(key.format(compressed=True))


@dataclass(frozen=True)
class KmsKey:
    """A KMS answer, checked: the X25519 key to encrypt to and the key that signed it."""

    public_key: bytes
    signer: bytes
    signed_with: str  # "signature_v1" | "signature"


def check_kms_answer(app_id: bytes, answer: dict[str, object]) -> KmsKey:
    """Parse GetAppEnvEncryptPubKey's JSON answer and recover its signer (v1 first)."""
    try:
        public_key = bytes.fromhex(str(answer.get("public_key") or ""))
        signature_v1 = bytes.fromhex(str(answer.get("signature_v1") or ""))
        signature = bytes.fromhex(str(answer.get("signature") or ""))
        timestamp = int(answer.get("timestamp") or 0)  # type: ignore[call-overload]
    except (ValueError, TypeError) as exc:
        raise SignatureError(f"malformed KMS answer: {exc}") from None
    if len(public_key) != X25519_LEN:
        raise SignatureError(f"KMS public key is {len(public_key)} bytes, expected {X25519_LEN}")
    if signature_v1:
        digest = signed_message(app_id, public_key, timestamp)
        return KmsKey(public_key, recover_signer(signature_v1, digest), "signature_v1")
    if signature:
        digest = signed_message(app_id, public_key, None)
        return KmsKey(public_key, recover_signer(signature, digest), "signature")
    raise SignatureError("the KMS answer carries no signature")


def normalize_signer(text: str) -> str:
    """A signer as stored in the whitelist: lowercase hex of 33 bytes, without ``0x``."""
    value = text.strip().lower().removeprefix("0x")
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        raise ValueError(f"{text!r} is not hex") from None
    if len(raw) != COMPRESSED_KEY_LEN or raw[0] not in (2, 3):
        raise ValueError(f"{text!r} is not a 33-byte compressed secp256k1 public key")
    return value


def env_plaintext(env: dict[str, str]) -> bytes:
    return json.dumps({"env": [{"key": k, "value": v} for k, v in env.items()]}).encode()


def encrypt_env(env: dict[str, str], public_key: bytes) -> bytes:
    """Seal ``env`` to the KMS's X25519 ``public_key`` (format in the module docstring)."""
    ephemeral = X25519PrivateKey.generate()
    shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(public_key))
    iv = os.urandom(IV_LEN)
    sealed = AESGCM(shared).encrypt(iv, env_plaintext(env), None)
    ephemeral_public = ephemeral.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return ephemeral_public + iv + sealed


def decrypt_env(blob: bytes, private_key: X25519PrivateKey) -> dict[str, str]:
    """What the guest does with the blob (used by tests to check the format end to end)."""
    ephemeral = X25519PublicKey.from_public_bytes(blob[:X25519_LEN])
    iv = blob[X25519_LEN:X25519_LEN + IV_LEN]
    plain = AESGCM(private_key.exchange(ephemeral)).decrypt(iv, blob[X25519_LEN + IV_LEN:], None)
    return {item["key"]: item["value"] for item in json.loads(plain)["env"]}
