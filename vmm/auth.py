"""API authentication: tokens and htpasswd, in front of every route but the console pages.

Accepted credentials, checked in order (dstack's rules):

1. ``X-Admin-Token: <token>``;
2. ``Authorization: Bearer <token>`` — decisive: a wrong bearer token is rejected outright;
3. ``Authorization: Basic b64(user:pass)`` where user:pass matches the bcrypt htpasswd file, or
   pass is a token, or pass is empty and user is a token;
4. GET only: ``?token=<token>``, removed from the query before the route sees it.

Tokens are compared as SHA-256 digests with ``hmac.compare_digest`` against every configured
token, so timing reveals neither the token nor which one matched. Enabled with no tokens and no
htpasswd entries denies everything (fail closed).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, urlencode

import bcrypt
from starlette.types import ASGIApp, Receive, Scope, Send

from vmm.config import AuthConfig
from vmm.exceptions import ConfigError

log = logging.getLogger(__name__)

REALM = 'Basic realm="dstack-vmm API"'
# The web console pages load without credentials; the API calls they make carry them.
PUBLIC_PATHS = frozenset({"/", "/v0", "/v1", "/beta"})
PUBLIC_PREFIXES = ("/res/",)


@dataclass(frozen=True)
class Authenticator:
    enabled: bool
    token_digests: tuple[bytes, ...]
    htpasswd: dict[str, bytes]

    @classmethod
    def from_config(cls, config: AuthConfig) -> Authenticator:
        tokens = tuple(_digest(t) for t in config.tokens if t)
        users: dict[str, bytes] = {}
        if config.htpasswd_file:
            users = load_htpasswd(Path(config.htpasswd_file))
        enabled = config.enabled or bool(config.htpasswd_file)
        if enabled and not tokens and not users:
            log.warning("auth is enabled but has no tokens or htpasswd users: all calls are denied")
        return cls(enabled=enabled, token_digests=tokens, htpasswd=users)

    def is_token(self, candidate: str) -> bool:
        digest = _digest(candidate)
        matched = False
        for known in self.token_digests:
            matched |= hmac.compare_digest(digest, known)
        return matched and bool(candidate)

    def check_basic(self, user: str, password: str) -> bool:
        if password and self.is_token(password):
            return True
        if not password and self.is_token(user):
            return True
        hashed = self.htpasswd.get(user)
        if hashed is None or not password:
            return False
        try:
            return bcrypt.checkpw(password.encode(), hashed)
        except ValueError:
            return False

    def authorize(self, method: str, headers: dict[str, str], query: str) -> tuple[bool, str]:
        """Return (allowed, query with any token removed)."""
        admin = headers.get("x-admin-token")
        if admin is not None and self.is_token(admin.strip()):
            return True, query
        authorization = headers.get("authorization", "")
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer":
            return self.is_token(value.strip()), query
        if scheme.lower() == "basic":
            credentials = _decode_basic(value.strip())
            if credentials is not None and self.check_basic(*credentials):
                return True, query
        if method == "GET" and query:
            pairs = parse_qsl(query, keep_blank_values=True)
            tokens = [v for k, v in pairs if k == "token"]
            if tokens and any(self.is_token(t) for t in tokens):
                return True, urlencode([(k, v) for k, v in pairs if k != "token"])
        return False, query


class AuthMiddleware:
    """Pure ASGI middleware, so streaming responses (/logs) pass through untouched."""

    def __init__(self, app: ASGIApp, authenticator: Authenticator) -> None:
        self.app = app
        self.auth = authenticator

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.auth.enabled or _is_public(scope["path"]):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        query = scope.get("query_string", b"").decode("latin-1")
        allowed, new_query = self.auth.authorize(scope["method"], headers, query)
        if not allowed:
            await _unauthorized(send)
            return
        if new_query != query:
            scope = dict(scope, query_string=new_query.encode("latin-1"))
        await self.app(scope, receive, send)


def load_htpasswd(path: Path) -> dict[str, bytes]:
    """Read ``user:bcrypt-hash`` lines; other hash kinds are refused at start."""
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise ConfigError(f"`auth.htpasswd_file`: cannot read {path}: {exc}") from None
    users: dict[str, bytes] = {}
    for number, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, hashed = line.partition(":")
        if not sep or not hashed.startswith(("$2a$", "$2b$", "$2y$")):
            raise ConfigError(
                f"`auth.htpasswd_file`: {path}:{number}: only bcrypt entries (user:$2y$...) "
                "are supported"
            )
        # python-bcrypt accepts $2a$/$2b$; $2y$ (htpasswd -B) is the same algorithm.
        users[user] = ("$2b$" + hashed[4:]).encode()
    return users


def warn_if_exposed(authenticator: Authenticator, tcp_hosts: Iterable[str]) -> None:
    if authenticator.enabled:
        return
    for host in tcp_hosts:
        if host not in ("127.0.0.1", "::1", "localhost") and not host.startswith("127."):
            log.warning(
                "auth is disabled and the API listens on %s: anyone who can reach it can "
                "create and remove VMs; set [auth] enabled = true with tokens",
                host,
            )


def _is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def _decode_basic(value: str) -> tuple[str, str] | None:
    try:
        decoded = base64.b64decode(value, validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, sep, password = decoded.partition(":")
    return (user, password) if sep else None


async def _unauthorized(send: Send) -> None:
    message = "unauthorized: a valid API token or user credential is required"
    body = json.dumps({"error": message, "message": message, "code": "UNAUTHENTICATED"}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 401,
            "headers": [
                (b"www-authenticate", REALM.encode()),
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
