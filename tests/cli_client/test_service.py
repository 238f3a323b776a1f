"""Running as a service: the systemd unit, scripts/install-service and `vmm --version`."""

from __future__ import annotations

import configparser
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.daemon_proc import checkout_env

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "scripts" / "vmm.service"
INSTALL = REPO / "scripts" / "install-service"


def read_unit(path: Path) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read_string(path.read_text())
    return parser


def vmm_bin() -> Path:
    """An existing `vmm` console script (the unit's ExecStart must name an executable)."""
    found = Path(sys.executable).parent / "vmm"
    if not found.is_file():
        pytest.skip(f"no vmm console script beside {sys.executable}")
    return found


def install(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(INSTALL), "--root", str(root), "--vmm-bin",
                           str(vmm_bin())], capture_output=True, text=True, timeout=60,
                          check=False)


def test_unit_key_settings() -> None:
    """The unit kills only the daemon on stop/restart (KillMode=process) and runs /etc's config."""
    unit = read_unit(UNIT)
    service = unit["Service"]
    assert service["KillMode"] == "process"  # a daemon restart must never stop the VMs
    assert service["ExecStart"] == "@VMM_BIN@ -c @CONFIG@ serve"
    assert service["Type"] == "exec"
    assert service["Restart"] == "on-failure"
    assert service["WorkingDirectory"] == "@STATE_DIR@"
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    assert "network-online.target" in unit["Unit"]["After"]


def test_install_service_writes_config_unit_and_state_dir(tmp_path: Path) -> None:
    """install-service puts the config under /etc/vmm (never overwriting it) and a filled-in unit."""
    result = install(tmp_path)
    assert result.returncode == 0, result.stderr
    config = tmp_path / "etc" / "vmm" / "vmm.toml"
    assert config.read_text() == (REPO / "vmm.toml.example").read_text()
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    assert (tmp_path / "var" / "lib" / "vmm").is_dir()
    unit_path = tmp_path / "etc" / "systemd" / "system" / "vmm.service"
    unit = read_unit(unit_path)
    assert unit["Service"]["ExecStart"] == f"{vmm_bin().resolve()} -c /etc/vmm/vmm.toml serve"
    assert unit["Service"]["KillMode"] == "process"
    assert "@" not in unit_path.read_text()

    config.write_text('address = "unix:/run/vmm.sock"\n')  # the operator's edit
    again = install(tmp_path)
    assert again.returncode == 0 and f"keeping {config}" in again.stdout
    assert config.read_text() == 'address = "unix:/run/vmm.sock"\n'


def test_installed_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    """systemd-analyze verify accepts the installed unit without a warning."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (apt package systemd)")
    assert install(tmp_path).returncode == 0
    unit = tmp_path / "etc" / "systemd" / "system" / "vmm.service"
    result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert str(unit) not in result.stderr, result.stderr  # no "unknown key" style warnings


def run_vmm(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vmm", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=60, check=False, env=checkout_env())


def test_version_names_the_config_in_use(tmp_path: Path) -> None:
    """vmm --version prints the version and the config file it would run with."""
    plain = run_vmm("--version", cwd=tmp_path)
    assert plain.returncode == 0
    assert plain.stdout.splitlines() == ["vmm 0.1.0", "config: (embedded defaults)"]
    (tmp_path / "vmm.toml").write_text("")
    assert f"config: {tmp_path / 'vmm.toml'}" in run_vmm("--version", cwd=tmp_path).stdout
    explicit = run_vmm("-c", "/etc/vmm/vmm.toml", "--version", cwd=tmp_path)
    assert "config: /etc/vmm/vmm.toml" in explicit.stdout
