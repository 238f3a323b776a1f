"""python -m guest_agent as a process: boot report, HTTP service and SIGTERM, on the host."""

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from guest_agent import BOOT_MARKER

REPO = Path(__file__).resolve().parents[2]


def test_agent_process_reports_boot_serves_and_stops_on_sigterm(tmp_path: Path) -> None:
    """The agent prints the compose line and marker, answers GET / and exits 0 on SIGTERM."""
    share = tmp_path / "share"
    share.mkdir()
    (share / "app-compose.json").write_text('{"name": "host-run"}')
    console = tmp_path / "console.log"
    argv = [
        sys.executable, "-m", "guest_agent", "--console", str(console), "--share-dir", str(share),
        "--no-mount", "--no-power-button", "--http-host", "127.0.0.1", "--http-port", "0",
        "--no-vsock", "--no-poweroff", "--state-dir", str(tmp_path / "state"),
        "--run-dir", str(tmp_path / "run"),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        text = ""
        while BOOT_MARKER not in text.splitlines():
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, text
            time.sleep(0.02)
            text = console.read_text() if console.exists() else ""
        match = re.search(r"^vmm-guest: http service on port (\d+)$", text, re.MULTILINE)
        assert match, text
        with urllib.request.urlopen(f"http://127.0.0.1:{match.group(1)}/", timeout=10) as resp:
            body = json.loads(resp.read())
        assert body["service"] == "vmm-guest"
        assert re.fullmatch(r"[0-9a-f]{64}", body["compose_sha256"])
        assert f"vmm-guest: compose-sha256={body['compose_sha256']}" in text.splitlines()
        identity = [json.loads(line) for line in text.splitlines() if '"compose_hash"' in line]
        assert len(identity) == 1, text
        assert identity[0]["compose_hash"] == body["compose_sha256"]
        assert identity[0]["app_id"] == body["compose_sha256"][:40]
        assert identity[0]["app_name"] == "host-run"
        assert re.fullmatch(r"[0-9a-f]{40}", identity[0]["instance_id"])

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if proc.stderr:
            proc.stderr.close()
