"""The KMS client: the one call the VMM makes to a KMS, GetAppEnvEncryptPubKey.

The request goes to ``<kms_url>/prpc/GetAppEnvEncryptPubKey?json`` with the app id as hex, and
the four fields come back unchanged; signature checks are the clients' job (dstack does the same).
TLS is not verified, as in dstack: a KMS is usually reached by a pinned address with its own
RA-TLS, and the signed key is what clients check.
"""

from __future__ import annotations

import json

import httpx

from vmm.core.exceptions import Conflict, Unavailable
from vmm.prpc import codec
from vmm.rpc import vmm_rpc_pb2 as pb

TIMEOUT = httpx.Timeout(60.0, connect=5.0)


class KmsClient:
    def __init__(self, url: str, *, timeout: httpx.Timeout = TIMEOUT) -> None:
        self.url = url.rstrip("/")
        self._client = httpx.AsyncClient(timeout=timeout, verify=False)  # noqa: S501 - see module doc

    async def aclose(self) -> None:
        await self._client.aclose()

    async def get_app_env_encrypt_pub_key(self, app_id: bytes) -> pb.PublicKeyResponse:
        if not self.url:
            raise Conflict("KMS is not configured (set kms_url in vmm.toml)")
        endpoint = f"{self.url}/prpc/GetAppEnvEncryptPubKey?json"
        try:
            response = await self._client.post(endpoint, json={"app_id": app_id.hex()})
        except httpx.HTTPError as exc:
            raise Unavailable(f"KMS at {self.url} is unreachable: {exc}") from None
        if response.status_code != 200:
            raise Unavailable(f"KMS at {self.url} refused: {_error_text(response)}")
        try:
            message = codec.from_json_bytes(response.content, pb.PublicKeyResponse)
        except ValueError as exc:
            raise Unavailable(f"KMS at {self.url} sent a malformed answer: {exc}") from None
        assert isinstance(message, pb.PublicKeyResponse)
        return message


def _error_text(response: httpx.Response) -> str:
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return f"HTTP {response.status_code}: {response.text[:200]}"
    if isinstance(body, dict):
        return f"HTTP {response.status_code}: {body.get('error') or body.get('message') or body}"
    return f"HTTP {response.status_code}: {body}"
