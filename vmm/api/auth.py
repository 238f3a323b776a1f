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

bcrypt is slow on purpose, so it never runs on the event loop: ``PasswordChecker`` hands it to a
small thread pool with a bounded backlog, spends the same bcrypt work on unknown users as on
known ones (so timing does not tell which users exist), and remembers recent successes for a
minute so a legitimate client does not pay bcrypt on every request.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import logging
import os
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, urlencode

import bcrypt
from starlette.types import ASGIApp, Receive, Scope, Send

from vmm.core.config import AuthConfig
from vmm.core.exceptions import ConfigError, Unauthorized, Unavailable

log = logging.getLogger(__name__)

REALM = 'Basic realm="dstack-vmm API"'
# The web console pages load without credentials; the API calls they make carry them. The API
# docs (the schema of the public proto and a static Swagger UI) are public for the same reason.
PUBLIC_PATHS = frozenset({"/", "/v0", "/v1", "/beta"})
PUBLIC_PREFIXES = ("/res/", "/api-docs/")

BCRYPT_WORKERS = 2
# Checks running or queued at once; past this a request is answered 503 at once instead of
# queueing without bound behind a flood of wrong passwords.
MAX_PENDING_CHECKS = 16
VERIFIED_TTL = 60.0
VERIFIED_MAX = 256
DEFAULT_COST = 12

CheckPw = Callable[[bytes, bytes], bool]


class _RecentlyVerified:
    """Keys of credentials that passed bcrypt lately: bounded in size and age."""

    def __init__(self, ttl: float, max_entries: int, clock: Callable[[], float]) -> None:
        self._ttl = ttl
        self._max = max_entries
        self._clock = clock
        self._expiry: OrderedDict[bytes, float] = OrderedDict()

    def __contains__(self, key: bytes) -> bool:
        expiry = self._expiry.get(key)
        if expiry is None:
            return False
        if expiry <= self._clock():
            del self._expiry[key]
            return False
        return True

    def add(self, key: bytes) -> None:
        self._expiry.pop(key, None)
        self._expiry[key] = self._clock() + self._ttl
        while len(self._expiry) > self._max:
            self._expiry.popitem(last=False)


class PasswordChecker:
    """htpasswd verification off the event loop, with the same cost for known and unknown users.

    Runs on the event loop thread only (the pool does the bcrypt work). ``checkpw`` is
    ``bcrypt.checkpw`` unless a test substitutes its own.
    """

    def __init__(
        self,
        users: dict[str, bytes],
        *,
        checkpw: CheckPw = bcrypt.checkpw,
        workers: int = BCRYPT_WORKERS,
        max_pending: int = MAX_PENDING_CHECKS,
        ttl: float = VERIFIED_TTL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.users = users
        self.dummy_hash = dummy_hash(users.values())
        self._checkpw = checkpw
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vmm-bcrypt")
        self._max_pending = max_pending
        self._pending = 0
        # A per-process key: the cache holds no plain digest an attacker could brute-force fast.
        self._cache_key = os.urandom(32)
        self._verified = _RecentlyVerified(ttl, VERIFIED_MAX, clock)

    async def check(self, user: str, password: str) -> bool:
        """True if ``password`` is ``user``'s; raises ``Unavailable`` when the backlog is full."""
        if not self.users or not password:
            return False  # decided without bcrypt whoever the user is, so nothing leaks
        hashed = self.users.get(user)
        # `user` never holds ':' (Basic splits on the first one), so the key is unambiguous.
        key = hmac.new(self._cache_key, f"{user}:{password}".encode(), hashlib.sha256).digest()
        if hashed is not None and key in self._verified:
            return True
        if self._pending >= self._max_pending:
            raise Unavailable("too many password checks in progress; retry shortly")
        self._pending += 1
        # An unknown user costs the same bcrypt work as a known one, then fails regardless.
        target = hashed if hashed is not None else self.dummy_hash
        future = asyncio.get_running_loop().run_in_executor(
            self._pool, _safe_checkpw, self._checkpw, password.encode(), target
        )
        # Counted until the thread is done, even if this request is cancelled meanwhile.
        future.add_done_callback(self._finished)
        matched = await asyncio.shield(future)
        if not (matched and hashed is not None):
            return False
        self._verified.add(key)
        return True

    @property
    def pending(self) -> int:
        """Checks running or queued in the pool."""
        return self._pending

    def _finished(self, _: object) -> None:
        self._pending -= 1


def _safe_checkpw(checkpw: CheckPw, password: bytes, hashed: bytes) -> bool:
    try:
        return checkpw(password, hashed)
    except ValueError:
        return False  # a malformed hash in the file matches nothing


def dummy_hash(hashes: Iterable[bytes]) -> bytes:
    """A well-formed bcrypt hash that matches nothing, at the cost most entries use."""
    costs = Counter(int(h[4:6]) for h in hashes if h[4:6].isdigit())
    cost = costs.most_common(1)[0][0] if costs else DEFAULT_COST
    return f"$2b${cost:02d}$".encode() + b"." * 53


@dataclass(frozen=True)
class Authenticator:
    enabled: bool
    token_digests: tuple[bytes, ...]
    passwords: PasswordChecker

    @classmethod
    def from_config(cls, config: AuthConfig) -> Authenticator:
        tokens = tuple(_digest(t) for t in config.tokens if t)
        users: dict[str, bytes] = {}
        if config.htpasswd_file:
            users = load_htpasswd(Path(config.htpasswd_file))
        enabled = config.enabled or bool(config.htpasswd_file)
        if enabled and not tokens and not users:
            log.warning("auth is enabled but has no tokens or htpasswd users: all calls are denied")
        return cls(enabled=enabled, token_digests=tokens, passwords=PasswordChecker(users))

    def is_token(self, candidate: str) -> bool:
        digest = _digest(candidate)
        matched = False
        for known in self.token_digests:
            matched |= hmac.compare_digest(digest, known)
        return matched and bool(candidate)

    async def check_basic(self, user: str, password: str) -> bool:
        if password and self.is_token(password):
            return True
        if not password and self.is_token(user):
            return True
        return await self.passwords.check(user, password)

    async def authorize(
        self, method: str, headers: dict[str, str], query: str
    ) -> tuple[bool, str]:
        """Return (allowed, query with any token removed); ``Unavailable`` if checks back up."""
        admin = headers.get("x-admin-token")
        if admin is not None and self.is_token(admin.strip()):
            return True, query
        authorization = headers.get("authorization", "")
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer":
            return self.is_token(value.strip()), query
        if scheme.lower() == "basic":
            credentials = _decode_basic(value.strip())
            if credentials is not None and await self.check_basic(*credentials):
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
        try:
            allowed, new_query = await self.auth.authorize(scope["method"], headers, query)
        except Unavailable as exc:
            await _refuse(send, exc.status_code, exc.code, exc.message, [(b"retry-after", b"1")])
            return
        if not allowed:
            message = "unauthorized: a valid API token or user credential is required"
            # A script that says so (the console sends X-Requested-With) handles the 401 with
            # its own prompt; a Basic challenge would make the browser pop its password dialog.
            challenge = [] if "x-requested-with" in headers else [
                (b"www-authenticate", REALM.encode())]
            await _refuse(send, Unauthorized.status_code, Unauthorized.code, message, challenge)
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


async def _refuse(
    send: Send, status: int, code: str, message: str, headers: list[tuple[bytes, bytes]]
) -> None:
    body = json.dumps({"error": message, "message": message, "code": code}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                *headers,
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
