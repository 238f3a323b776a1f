"""API authentication on the real daemon: every accepted credential and every refusal."""

from __future__ import annotations

import asyncio
import base64
import threading
from collections.abc import Iterator
from pathlib import Path

import bcrypt
import httpx
import pytest
from starlette.types import Receive, Scope, Send

from tests.support.daemon_proc import DaemonProcess, start_daemon
from tests.support.short_dirs import short_dir
from vmm.api.auth import Authenticator, AuthMiddleware, PasswordChecker, load_htpasswd
from vmm.core.config import AuthConfig
from vmm.core.exceptions import ConfigError

TOKEN = "s3cret-token"
OTHER_TOKEN = "second-token"


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.fixture(scope="module")
def secured() -> Iterator[DaemonProcess]:
    with short_dir("vmma") as workdir:
        hashed = bcrypt.hashpw(b"pa55word", bcrypt.gensalt(rounds=4)).decode()
        # htpasswd -B writes $2y$; the daemon must accept it.
        (workdir / "htpasswd").write_text(f"# users\nalice:$2y${hashed[4:]}\n")
        proc = start_daemon(
            workdir,
            addresses=["tcp:127.0.0.1:0"],
            extra_config=(
                f'[auth]\nenabled = true\ntokens = ["{TOKEN}", "{OTHER_TOKEN}", ""]\n'
                f'htpasswd_file = "{workdir / "htpasswd"}"\n'
            ),
        )
        try:
            yield proc
        finally:
            proc.destroy()


@pytest.mark.parametrize(
    "headers",
    [
        {"Authorization": f"Bearer {TOKEN}"},
        {"Authorization": f"Bearer   {OTHER_TOKEN}"},
        {"X-Admin-Token": TOKEN},
        {"Authorization": basic("alice", "pa55word")},
        {"Authorization": basic("anyone", TOKEN)},
        {"Authorization": basic(TOKEN, "")},
    ],
    ids=["bearer", "bearer-trimmed", "admin-header", "htpasswd", "basic-token-pass",
         "basic-token-user"],
)
def test_accepted_credentials(secured: DaemonProcess, headers: dict[str, str]) -> None:
    """Each accepted credential form opens /prpc."""
    with secured.client() as client:
        response = client.post("/prpc/Version?json", headers=headers)
    assert response.status_code == 200


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "Bearer"},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"X-Admin-Token": "wrong"},
        {"Authorization": basic("alice", "wrong")},
        {"Authorization": basic("bob", "pa55word")},
        {"Authorization": basic("alice", "")},
        {"Authorization": "Basic !!!notbase64"},
        {"Authorization": f"Token {TOKEN}"},
    ],
    ids=["none", "bearer-wrong", "bearer-empty", "bearer-suffix", "admin-wrong", "basic-wrong",
         "basic-unknown-user", "basic-empty-pass", "basic-garbage", "unknown-scheme"],
)
def test_refused_credentials(secured: DaemonProcess, headers: dict[str, str]) -> None:
    """Missing or wrong credentials in every form get 401 with WWW-Authenticate."""
    with secured.client() as client:
        response = client.post("/prpc/Version?json", headers=headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == 'Basic realm="dstack-vmm API"'
    assert response.json()["code"] == "UNAUTHENTICATED"
    assert response.headers["x-request-id"]


def test_bearer_is_decisive(secured: DaemonProcess) -> None:
    """A wrong bearer token is refused even when a valid query token is also present."""
    with secured.client() as client:
        response = client.get(
            f"/prpc/Version?token={TOKEN}", headers={"Authorization": "Bearer wrong"}
        )
    assert response.status_code == 401


def test_query_token_on_get_only(secured: DaemonProcess) -> None:
    """?token= works on GET and is removed before the RPC sees the query; POST ignores it."""
    with secured.client() as client:
        ok = client.get("/prpc/GetComposeHash", params={"token": TOKEN, "name": "a",
                                                        "compose_file": "{}"})
        wrong = client.get("/prpc/Version", params={"token": "nope"})
        post = client.post(f"/prpc/Version?json&token={TOKEN}")
    assert ok.status_code == 200
    assert wrong.status_code == 401
    assert post.status_code == 401


def test_errors_from_unknown_routes_still_need_auth(secured: DaemonProcess) -> None:
    """Even a 404 path is answered 401 first, so the surface is not probeable."""
    with secured.client() as client:
        assert client.post("/prpc/a/b").status_code == 401
        assert client.post("/prpc/a/b", headers={"X-Admin-Token": TOKEN}).status_code == 404


def test_console_pages_need_no_credential(secured: DaemonProcess) -> None:
    """The web console pages are exempt (their API calls are not)."""
    with secured.client() as client:
        response = client.get("/")
    assert response.status_code != 401


def test_enabled_without_credentials_denies_everything(tmp_path: Path) -> None:
    """auth enabled with no tokens and no htpasswd refuses every call (fail closed)."""
    auth = Authenticator.from_config(AuthConfig(enabled=True, tokens=("",)))
    assert auth.enabled
    assert asyncio.run(auth.authorize("POST", {"authorization": "Bearer "}, "")) == (False, "")
    assert asyncio.run(auth.authorize("POST", {"x-admin-token": ""}, "")) == (False, "")
    assert asyncio.run(auth.authorize("GET", {}, "token=")) == (False, "token=")


def test_htpasswd_refuses_non_bcrypt_entries(tmp_path: Path) -> None:
    """An htpasswd line with a non-bcrypt hash stops the daemon at start, naming the line."""
    path = tmp_path / "htpasswd"
    path.write_text("bob:{SHA}abc\n")
    with pytest.raises(ConfigError, match="htpasswd:1"):
        load_htpasswd(path)
    with pytest.raises(ConfigError, match="cannot read"):
        load_htpasswd(tmp_path / "missing")


def test_warning_when_open_on_a_public_address() -> None:
    """Auth off on a non-loopback TCP address is logged as a warning."""
    with short_dir("vmma") as workdir:
        daemon = start_daemon(workdir, addresses=["tcp:0.0.0.0:0"])
        try:
            port = daemon.base_url.rsplit(":", 1)[1]
            with httpx.Client(timeout=10) as client:
                assert client.post(f"http://127.0.0.1:{port}/prpc/Version?json").status_code == 200
            assert "auth is disabled and the API listens on 0.0.0.0" in daemon.log()
        finally:
            daemon.destroy()


# --- bcrypt load --------------------------------------------------------------------------------

HAMMER_THREADS = 4
HAMMER_EACH = 4
# With bcrypt on the event loop, under one token request got through per wrong-password check
# (4 to 11 in 16 checks); off the loop, a hundred or more do. The bound sits far from both.
TOKENS_PER_CHECK = 4


def test_wrong_passwords_do_not_stall_token_requests() -> None:
    """While clients hammer a known user with wrong passwords, token requests keep flowing."""
    with short_dir("vmma") as workdir:
        hashed = bcrypt.hashpw(b"right", bcrypt.gensalt(rounds=12)).decode()
        (workdir / "htpasswd").write_text(f"carol:{hashed}\n")
        proc = start_daemon(
            workdir,
            extra_config=(
                f'[auth]\nenabled = true\ntokens = ["{TOKEN}"]\n'
                f'htpasswd_file = "{workdir / "htpasswd"}"\n'
            ),
        )
        try:
            hammer_codes: list[int] = []
            token_codes: list[int] = []
            hammering_done = threading.Event()

            def hammer() -> None:
                with proc.client() as client:
                    for _ in range(HAMMER_EACH):
                        response = client.post(
                            "/prpc/Version?json", headers={"Authorization": basic("carol", "no")}
                        )
                        hammer_codes.append(response.status_code)

            def tokens() -> None:
                with proc.client() as client:
                    while not hammering_done.is_set():
                        response = client.post(
                            "/prpc/Version?json", headers={"Authorization": f"Bearer {TOKEN}"}
                        )
                        token_codes.append(response.status_code)

            hammers = [threading.Thread(target=hammer) for _ in range(HAMMER_THREADS)]
            for thread in hammers:
                thread.start()
            token_thread = threading.Thread(target=tokens)
            token_thread.start()
            for thread in hammers:
                thread.join(timeout=120)
            hammering_done.set()
            token_thread.join(timeout=60)
            assert not token_thread.is_alive()
            assert not any(thread.is_alive() for thread in hammers)

            assert hammer_codes == [401] * (HAMMER_THREADS * HAMMER_EACH)
            assert set(token_codes) == {200}
            assert len(token_codes) >= TOKENS_PER_CHECK * len(hammer_codes), len(token_codes)
            with proc.client() as client:
                right = client.post(
                    "/prpc/Version?json", headers={"Authorization": basic("carol", "right")}
                )
            assert right.status_code == 200
        finally:
            proc.destroy()


# --- PasswordChecker ----------------------------------------------------------------------------


class RecordingCheckpw:
    """bcrypt.checkpw, noting each call's hash and thread; ``gate`` (if set) holds calls back."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.calls: list[tuple[bytes, int]] = []
        self.gate = gate

    def __call__(self, password: bytes, hashed: bytes) -> bool:
        self.calls.append((hashed, threading.get_ident()))
        if self.gate is not None:
            assert self.gate.wait(timeout=30)
        return bcrypt.checkpw(password, hashed)


def users(**passwords: str) -> dict[str, bytes]:
    return {u: bcrypt.hashpw(p.encode(), bcrypt.gensalt(rounds=5)) for u, p in passwords.items()}


def test_password_check_runs_off_the_event_loop_thread() -> None:
    """bcrypt runs in a worker thread, never on the thread running the event loop."""
    checkpw = RecordingCheckpw()
    checker = PasswordChecker(users(alice="pw"), checkpw=checkpw)

    async def scenario() -> tuple[bool, int]:
        return await checker.check("alice", "pw"), threading.get_ident()

    matched, loop_thread = asyncio.run(scenario())
    assert matched
    assert [thread for _, thread in checkpw.calls] != [loop_thread]
    assert len(checkpw.calls) == 1


def test_unknown_user_costs_one_check_at_the_same_cost() -> None:
    """An unknown user runs exactly one bcrypt check, at the entries' cost, and is refused."""
    entries = users(alice="pw", bob="pw2")
    checkpw = RecordingCheckpw()
    checker = PasswordChecker(entries, checkpw=checkpw)
    assert not asyncio.run(checker.check("mallory", "pw"))
    assert [hashed[:7] for hashed, _ in checkpw.calls] == [b"$2b$05$"]
    assert not asyncio.run(checker.check("alice", "wrong"))
    assert [hashed for hashed, _ in checkpw.calls][1:] == [entries["alice"]]


def test_only_successful_checks_are_remembered_and_only_briefly() -> None:
    """A right password skips bcrypt for the TTL; wrong ones and expired entries run it again."""
    now = [0.0]
    checkpw = RecordingCheckpw()
    checker = PasswordChecker(users(alice="pw"), checkpw=checkpw, ttl=60, clock=lambda: now[0])

    def check(user: str, password: str) -> bool:
        return asyncio.run(checker.check(user, password))

    assert check("alice", "pw")
    assert check("alice", "pw")
    assert len(checkpw.calls) == 1
    assert not check("alice", "nope")
    assert not check("alice", "nope")
    assert len(checkpw.calls) == 3
    now[0] = 60.0
    assert check("alice", "pw")
    assert len(checkpw.calls) == 4


def test_full_backlog_is_answered_503_at_once() -> None:
    """Past the pending-check bound a Basic request gets 503 with Retry-After, then recovers."""
    gate = threading.Event()
    checkpw = RecordingCheckpw(gate)
    checker = PasswordChecker(users(alice="pw"), checkpw=checkpw, workers=1, max_pending=2)
    authenticator = Authenticator(enabled=True, token_digests=(), passwords=checker)

    async def ok_app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    transport = httpx.ASGITransport(app=AuthMiddleware(ok_app, authenticator))
    header = {"Authorization": basic("alice", "pw")}

    async def scenario() -> list[int]:
        async with httpx.AsyncClient(transport=transport, base_url="http://vmm") as client:
            first = [asyncio.create_task(client.get("/x", headers=header)) for _ in range(2)]
            while checker.pending < 2:  # noqa: ASYNC110 - polls the checker's own count
                await asyncio.sleep(0.01)
            refused = await client.get("/x", headers=header)
            assert refused.status_code == 503
            assert refused.headers["retry-after"] == "1"
            assert refused.json()["code"] == "UNAVAILABLE"
            assert "too many password checks" in refused.json()["message"]
            gate.set()
            done = [response.status_code for response in await asyncio.gather(*first)]
            again = await client.get("/x", headers={"Authorization": basic("mallory", "pw")})
            return [*done, again.status_code]

    async def bounded() -> list[int]:
        async with asyncio.timeout(30):
            return await scenario()

    try:
        assert asyncio.run(bounded()) == [200, 200, 401]
    finally:
        gate.set()
