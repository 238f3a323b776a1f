"""vmm-cli's pure parts: sizes, port maps, GPUs, env files and the --wait loop."""

from __future__ import annotations

import argparse
import io
from pathlib import Path
from typing import Any

import pytest

from vmm.cli_client import parsing
from vmm.cli_client.client import CliError
from vmm.cli_client.waiting import wait_for_boot


@pytest.mark.parametrize(("text", "mb"), [("1024", 1024), ("2G", 2048), ("512M", 512),
                                          ("1T", 1048576), ("2gb", 2048)])
def test_memory_sizes(text: str, mb: int) -> None:
    """Memory sizes: bare numbers are MB; M, G and T suffixes scale."""
    assert parsing.size_mb(text) == mb


def test_disk_swap_and_port_parsing() -> None:
    """Disk sizes are GB, swap bytes; ports are proto[:addr]:host:vm with 127.0.0.1 by default."""
    assert parsing.size_gb("20") == 20 and parsing.size_gb("1T") == 1024
    assert parsing.size_bytes("64") == 64 * 2**20 and parsing.size_bytes("1G") == 2**30
    assert parsing.port("tcp:8080:80") == {"protocol": "tcp", "host_address": "127.0.0.1",
                                           "host_port": 8080, "vm_port": 80}
    assert parsing.port("udp:0.0.0.0:53:53")["host_address"] == "0.0.0.0"
    for bad in ("1.5G", "lots", "2M"):
        with pytest.raises(argparse.ArgumentTypeError, match="bad"):
            parsing.size_gb(bad)
    for bad in ("sctp:1:2", "tcp:80", "tcp:a:b", "tcp:0:80", "tcp:80:70000"):
        with pytest.raises(argparse.ArgumentTypeError, match="bad"):
            parsing.port(bad)


def test_gpu_config() -> None:
    """--gpu SLOT lists slots; --gpu all or --ppcie attaches all; nothing gives no GpuConfig."""
    assert parsing.gpu_config([], False) is None
    assert parsing.gpu_config(["18:00.0"], False) == {
        "attach_mode": "listed", "gpus": [{"slot": "18:00.0"}]}
    assert parsing.gpu_config(["all"], False) == {"attach_mode": "all", "gpus": []}
    assert parsing.gpu_config([], True) == {"attach_mode": "all", "gpus": []}


def test_env_file_forms_and_errors(tmp_path: Path) -> None:
    """Env files: comments, export, quotes and '=' in values; a bad line is named, not skipped."""
    path = tmp_path / "app.env"
    path.write_text("# c\n\nexport A=1\nB='two words'\nC=\"x=y\"\nD=\n")
    assert parsing.parse_env_file(path) == {"A": "1", "B": "two words", "C": "x=y", "D": ""}
    path.write_text("A=1\n1BAD=2\n")
    with pytest.raises(argparse.ArgumentTypeError, match=r"app\.env:2: expected KEY=VALUE"):
        parsing.parse_env_file(path)
    with pytest.raises(argparse.ArgumentTypeError, match="cannot read env file"):
        parsing.parse_env_file(tmp_path / "missing.env")


class Script:
    """GetInfo answers in order (the last repeats) and a clock that advances per sleep."""

    def __init__(self, *answers: dict[str, Any]) -> None:
        self.answers = list(answers)
        self.now = 0.0

    def get_info(self) -> dict[str, Any]:
        return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def run_wait(script: Script, timeout: float = 10) -> str:
    out = io.StringIO()
    wait_for_boot(script.get_info, "vm1", timeout, stream=out, clock=lambda: script.now,
                  sleep=script.sleep)
    return out.getvalue()


def test_wait_prints_each_step_until_done() -> None:
    """--wait prints one line per new boot step (not a TTY) and returns at "done"."""
    steps = [{"status": "running", "boot_progress": p, "boot_error": ""}
             for p in ("booting", "booting", "mounting host share", "done")]
    assert run_wait(Script(*steps)).splitlines() == [
        "vm1: running booting", "vm1: running mounting host share", "vm1: running done"]


def test_wait_fails_on_boot_error_exit_and_timeout() -> None:
    """A boot error, a VM that exits, or the timeout end the wait with a failure naming it."""
    with pytest.raises(CliError, match="boot failed: no disk"):
        run_wait(Script({"status": "running", "boot_progress": "x", "boot_error": "no disk"}))
    with pytest.raises(CliError, match="is exited before its boot finished"):
        run_wait(Script({"status": "exited", "boot_progress": "booting", "boot_error": ""}))
    with pytest.raises(CliError, match=r"timed out after 3 s .*last step: booting"):
        run_wait(Script({"status": "running", "boot_progress": "booting", "boot_error": ""}), 3)
