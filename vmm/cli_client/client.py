"""The HTTP side of ``vmm-cli``: where the daemon is, how to authenticate, one call.

Settings come, in this order, from the command line, the environment (``DSTACK_VMM_URL``,
``DSTACK_VMM_TOKEN``, ``DSTACK_VMM_AUTH_USER``, ``DSTACK_VMM_AUTH_PASSWORD``) and
``~/.dstack-vmm/config.json`` (``url``, ``auth_token``, ``auth_user``, ``auth_password``), the
names dstack's vmm-cli uses, so one config serves both tools.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

DEFAULT_URL = "http://127.0.0.1:9080"
CALL_TIMEOUT = 60.0


class CliError(Exception):
    """A failure to report on one line (the daemon's message when it sent one); exit 1."""


def config_dir() -> Path:
    return Path.home() / ".dstack-vmm"


def load_json_file(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; {} when the file is absent; CliError when it is broken."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise CliError(f"{path}: {exc}") from None
    if not isinstance(data, dict):
        raise CliError(f"{path}: expected a JSON object")
    return data


@dataclass(frozen=True)
class Settings:
    url: str
    token: str
    user: str
    password: str


def resolve_settings(url: str | None, token: str | None, user: str | None,
                     password: str | None) -> Settings:
    """Flags win over the environment, which wins over the config file."""
    saved = load_json_file(config_dir() / "config.json")

    def pick(flag: str | None, env: str, key: str, default: str = "") -> str:
        if flag:
            return flag
        return os.environ.get(env) or str(saved.get(key) or default)

    return Settings(
        url=pick(url, "DSTACK_VMM_URL", "url", DEFAULT_URL),
        token=pick(token, "DSTACK_VMM_TOKEN", "auth_token"),
        user=pick(user, "DSTACK_VMM_AUTH_USER", "auth_user"),
        password=pick(password, "DSTACK_VMM_AUTH_PASSWORD", "auth_password"),
    )


def error_message(response: httpx.Response) -> str:
    """The daemon's ``error`` (dstack's key) or ``message``, else the body, else the status."""
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        body = None
    if isinstance(body, dict):
        text = body.get("error") or body.get("message")
        if text:
            return str(text)
    return response.text.strip() or f"HTTP {response.status_code}"


class Client:
    """``POST /prpc/<Method>?json`` against a daemon on TCP or a Unix socket (``unix:/path``)."""

    def __init__(self, settings: Settings) -> None:
        headers = {"Authorization": f"Bearer {settings.token}"} if settings.token else {}
        auth = (httpx.BasicAuth(settings.user, settings.password)
                if settings.user and not settings.token else None)
        self.url = settings.url
        if settings.url.startswith("unix:"):
            transport = httpx.HTTPTransport(uds=settings.url.removeprefix("unix:"))
            self.http = httpx.Client(transport=transport, base_url="http://vmm", headers=headers,
                                     auth=auth, timeout=CALL_TIMEOUT)
        else:
            # TLS is not verified, as in dstack's vmm-cli: daemons usually use a self-signed cert.
            self.http = httpx.Client(base_url=settings.url.rstrip("/"), headers=headers, auth=auth,
                                     timeout=CALL_TIMEOUT, verify=False)  # noqa: S501

    def call(self, method: str, body: dict[str, Any] | None = None) -> Any:
        try:
            response = self.http.post(f"/prpc/{method}?json", json=body or {})
        except httpx.HTTPError as exc:
            raise CliError(f"cannot reach the VMM at {self.url}: {exc}") from None
        if response.status_code != 200:
            raise CliError(f"{method} failed: {error_message(response)}")
        return response.json() if response.content else None

    def vm_info(self, vm_id: str) -> dict[str, Any]:
        answer = self.call("GetInfo", {"id": vm_id})
        if not answer or not answer.get("found"):
            raise CliError(f"VM not found: {vm_id}")
        info: dict[str, Any] = answer["info"]
        return info

    def close(self) -> None:
        self.http.close()
