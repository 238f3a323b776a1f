"""The `vmm` command: check-config and argument handling."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_vmm(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vmm", *args], cwd=cwd, capture_output=True, text=True,
        timeout=60, check=False,
    )


def test_check_config_accepts_the_example(tmp_path: Path) -> None:
    """check-config on vmm.toml.example succeeds and prints what it resolved."""
    result = run_vmm("-c", str(ROOT / "vmm.toml.example"), "check-config", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "config OK" in result.stdout
    assert "tcp:127.0.0.1:9080" in result.stdout
    assert "accel:" in result.stdout


def test_check_config_reads_vmm_toml_from_the_working_directory(tmp_path: Path) -> None:
    """Without -c, ./vmm.toml is used when present."""
    (tmp_path / "vmm.toml").write_text('address = "unix:./here.sock"\n')
    result = run_vmm("check-config", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "unix:./here.sock" in result.stdout
    assert not (tmp_path / "here.sock").exists()


def test_check_config_rejects_a_bad_key(tmp_path: Path) -> None:
    """A bad config exits 2 with the key named on stderr, without a traceback."""
    (tmp_path / "vmm.toml").write_text("[cvm]\ncid_start = -5\n")
    result = run_vmm("check-config", cwd=tmp_path)
    assert result.returncode == 2
    assert "`cvm.cid_start`" in result.stderr
    assert "Traceback" not in result.stderr


def test_version_flag(tmp_path: Path) -> None:
    """--version prints the version."""
    result = run_vmm("--version", cwd=tmp_path)
    assert result.returncode == 0
    assert result.stdout.startswith("vmm ")
