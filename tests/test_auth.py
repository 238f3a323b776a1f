"""API authentication on the real daemon: every accepted credential and every refusal."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import bcrypt
import httpx
import pytest

from tests.support.daemon_proc import DaemonProcess, start_daemon
from tests.support.short_dirs import short_dir
from vmm.auth import Authenticator, load_htpasswd
from vmm.config import AuthConfig
from vmm.exceptions import ConfigError

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
    assert auth.authorize("POST", {"authorization": "Bearer "}, "") == (False, "")
    assert auth.authorize("POST", {"x-admin-token": ""}, "") == (False, "")
    assert auth.authorize("GET", {}, "token=") == (False, "token=")


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
