"""The console's files: the page at each of its paths and its assets, all from package data."""

from __future__ import annotations

import re

from tests.support.daemon_proc import DaemonProcess
from vmm.api.console import ASSETS


def test_the_page_is_served_at_each_console_path_with_a_strict_csp(daemon: DaemonProcess) -> None:
    """/, /v0, /v1 and /beta serve the same page; its policy allows only the daemon's own files."""
    with daemon.client() as client:
        pages = [client.get(path) for path in ("/", "/v0", "/v1", "/beta")]
    assert all(p.status_code == 200 for p in pages)
    assert len({p.text for p in pages}) == 1
    csp = pages[0].headers["content-security-policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp
    assert pages[0].headers["x-content-type-options"] == "nosniff"


def test_every_file_the_page_names_is_served_and_urls_are_relative(
    daemon: DaemonProcess,
) -> None:
    """Each module and stylesheet loads; no URL in the page or modules names a host or root."""
    with daemon.client() as client:
        page = client.get("/").text
        bodies = {name: client.get(f"/res/console/{name}") for name in ASSETS}
        unknown = client.get("/res/console/nothing.js")
    assert all(r.status_code == 200 for r in bodies.values())
    assert bodies["app.js"].headers["content-type"].startswith("text/javascript")
    assert unknown.status_code == 404  # only the listed files, never a path
    for text in [page, *(r.text for r in bodies.values())]:
        assert not re.search(r"""(src|href)=["'](https?:|/)""", text)
        assert not re.search(r"""(fetch|import|from|EventStream)\s*\(?\s*["'`](https?:|/)""", text)
        assert not re.search(r"""(rpc|authedFetch|streamText)\(\s*[`"']/""", text)
