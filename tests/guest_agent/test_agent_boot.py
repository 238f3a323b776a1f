"""guest_agent.boot and console: what the host reads on the serial console at boot."""

import hashlib
from pathlib import Path

from guest_agent import BOOT_MARKER, boot, system
from guest_agent.console import Console


def test_report_prints_compose_line_then_marker(tmp_path: Path) -> None:
    """Boot ends with the compose-sha256 line followed by the exact marker line."""
    (tmp_path / "app-compose.json").write_bytes(b"{}")
    console = Console(tmp_path / "console.log")
    state = boot.prepare(console, tmp_path, mount=False)
    boot.report_ready(console, state)
    console.close()
    lines = (tmp_path / "console.log").read_text().splitlines()
    assert lines == [f"vmm-guest: compose-sha256={hashlib.sha256(b'{}').hexdigest()}", BOOT_MARKER]


def test_missing_compose_reports_none(tmp_path: Path) -> None:
    """Without a compose file the hash is reported as "none"."""
    console = Console(tmp_path / "console.log")
    state = boot.prepare(console, tmp_path / "empty", mount=False)
    assert state.compose_sha256 is None
    assert not state.share_mounted
    assert boot.compose_line(state) == "compose-sha256=none"
    console.close()


def test_absent_share_is_logged_and_boot_continues(tmp_path: Path) -> None:
    """With mounting on but no 9p device carrying the tag, boot logs it and goes on."""
    console = Console(tmp_path / "console.log")
    state = boot.prepare(console, tmp_path / "dstack", mount=True, tag="no-such-tag-here")
    console.close()
    assert not state.share_mounted
    assert "absent" in (tmp_path / "console.log").read_text()


def test_uptime_is_the_first_field_of_proc_uptime() -> None:
    """parse_uptime returns the seconds-since-boot field of /proc/uptime as a float."""
    assert system.parse_uptime("123.45 678.90\n") == 123.45
