"""The log level changes at run time (SetLogLevel) and GetMeta reports it."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from tests.support.daemon_proc import DaemonProcess
from tests.support.vm_ops import call, error_of, rpc, wait_for
from vmm.core import log_level


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root, httpx_logger = logging.getLogger(), logging.getLogger("httpx")
    saved = root.level, httpx_logger.level
    try:
        yield
    finally:
        root.setLevel(saved[0])
        httpx_logger.setLevel(saved[1])


def test_set_level_moves_root_and_keeps_httpx_quiet(restore_logging: None) -> None:
    """set_level sets the root level; httpx never goes below WARNING; current_level names it."""
    log_level.set_level("debug")
    assert logging.getLogger().level == logging.DEBUG
    assert logging.getLogger("httpx").level == logging.WARNING
    assert log_level.current_level() == "debug"
    log_level.set_level("error")
    assert logging.getLogger("httpx").level == logging.ERROR
    assert log_level.current_level() == "error"


def test_set_level_refuses_an_unknown_level(restore_logging: None) -> None:
    """An unknown level is a ValueError naming the valid ones, and changes nothing."""
    log_level.set_level("info")
    with pytest.raises(ValueError, match="debug, info, warning, error"):
        log_level.set_level("verbose")
    assert log_level.current_level() == "info"


def test_set_log_level_applies_without_restart(daemon: DaemonProcess) -> None:
    """SetLogLevel changes what the running daemon logs at once, and GetMeta reports the level."""
    with daemon.client() as client:
        assert rpc(client, "GetMeta")["log_level"] == "info"
        # Its own announcement is a WARNING: hidden at "error", shown at "warning".
        rpc(client, "SetLogLevel", {"level": "error"})
        assert rpc(client, "GetMeta")["log_level"] == "error"
        rpc(client, "SetLogLevel", {"level": "warning"})
        wait_for("the announcement", lambda: "log level set to warning" in daemon.log(), 10)
        assert "log level set to error" not in daemon.log()
        assert rpc(client, "GetMeta")["log_level"] == "warning"
        message = error_of(call(client, "SetLogLevel", {"level": "verbose"}), 400)
        assert "`level`" in message and "debug, info, warning, error" in message
        assert rpc(client, "GetMeta")["log_level"] == "warning"
        rpc(client, "SetLogLevel", {"level": "info"})


def test_a_forwarded_for_header_does_not_change_who_a_call_is_logged_as(
    daemon: DaemonProcess,
) -> None:
    """X-Forwarded-For from a local client is not trusted: the log names the real peer."""
    with daemon.client(headers={"X-Forwarded-For": "203.0.113.9"}) as client:
        rpc(client, "SetLogLevel", {"level": "warning"})
        wait_for("the announcement", lambda: "log level set to warning" in daemon.log(), 10)
        rpc(client, "SetLogLevel", {"level": "info"})
    line = next(line for line in daemon.log().splitlines() if "log level set to warning" in line)
    assert "by 127.0.0.1:" in line
    assert "203.0.113.9" not in daemon.log()
