"""run_host_tool: exit status and stderr (or merged output), stdin, and a hung tool killed."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from vmm.core.host_tool import run_host_tool


def test_status_and_stderr_come_back_and_stdout_only_when_merged() -> None:
    """stderr is returned alone; with merge_output stdout and stderr come back together."""
    script = "echo out; echo err >&2; exit 3"
    assert asyncio.run(run_host_tool(["sh", "-c", script], 10)) == (3, b"err\n")
    status, output = asyncio.run(run_host_tool(["sh", "-c", script], 10, merge_output=True))
    assert status == 3 and sorted(output.splitlines()) == [b"err", b"out"]


def test_stdin_reaches_the_tool() -> None:
    """Bytes given as stdin are what the tool reads."""
    result = asyncio.run(run_host_tool(["sh", "-c", "cat >&2"], 10, stdin=b"table ip t {}\n"))
    assert result == (0, b"table ip t {}\n")


def test_a_hung_tool_is_killed_and_reaped(tmp_path: Path) -> None:
    """Past the deadline: TimeoutError, and the tool's process is gone (no zombie left)."""
    pid_file = tmp_path / "pid"
    with pytest.raises(TimeoutError):
        asyncio.run(run_host_tool(["sh", "-c", f"echo $$ > {pid_file}; exec sleep 60"], 2.0))
    pid = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
