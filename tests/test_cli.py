"""The `vmm` command: check-config and argument handling."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.daemon_proc import checkout_env

ROOT = Path(__file__).resolve().parent.parent


def run_vmm(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vmm", *args], cwd=cwd, capture_output=True, text=True,
        timeout=60, check=False, env=checkout_env(),
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


@pytest.mark.parametrize("command", ["check-config", "serve"])
@pytest.mark.parametrize("where", ["before", "after", "after-long"])
def test_config_option_before_or_after_the_subcommand(
    tmp_path: Path, command: str, where: str
) -> None:
    """-c/--config FILE is read whether it comes before or after any subcommand."""
    bad = tmp_path / "bad.toml"
    bad.write_text("[cvm]\ncid_start = -5\n")
    args = {
        "before": ["-c", str(bad), command],
        "after": [command, "-c", str(bad)],
        "after-long": [command, f"--config={bad}"],
    }[where]
    result = run_vmm(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert "`cvm.cid_start`" in result.stderr, result.stderr


def test_check_config_with_the_option_after_it(tmp_path: Path) -> None:
    """`vmm check-config -c FILE`, as the README writes it, validates FILE."""
    result = run_vmm("check-config", "-c", str(ROOT / "vmm.toml.example"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"config OK: {ROOT / 'vmm.toml.example'}" in result.stdout


def test_subcommand_without_the_option_keeps_the_one_before_it(tmp_path: Path) -> None:
    """`vmm -c FILE check-config` is not reset to ./vmm.toml by the subcommand's own option."""
    (tmp_path / "vmm.toml").write_text('address = "unix:./here.sock"\n')
    result = run_vmm("-c", str(ROOT / "vmm.toml.example"), "check-config", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "tcp:127.0.0.1:9080" in result.stdout
    assert "here.sock" not in result.stdout
