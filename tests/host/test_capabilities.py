"""Host capability decisions: what `auto` picks and what explicit values force."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmm.core.config import CvmConfig
from vmm.core.exceptions import ConfigError
from vmm.host.capabilities import HostProbe, decide, detect

BARE = HostProbe(cpu_flags=frozenset(), kvm_usable=True, tdx=False, sev_snp=False,
                 vhost_vsock=False, bridges=False)
VMX = HostProbe(cpu_flags=frozenset({"vmx"}), kvm_usable=True, tdx=True, sev_snp=False,
                vhost_vsock=True, bridges=True)


def test_auto_without_vmx_is_tcg_no_tee_serial() -> None:
    """This machine's case: /dev/kvm exists but no vmx/svm, so TCG, no TEE, serial channel."""
    assert decide(CvmConfig(), BARE) == ("tcg", "none", "serial", "max")


def test_auto_with_vmx_and_tdx() -> None:
    """With vmx, a working /dev/kvm and TDX, auto picks KVM, TDX, vsock and -cpu host."""
    assert decide(CvmConfig(), VMX) == ("kvm", "tdx", "vsock", "host")


def test_explicit_values_win() -> None:
    """Explicit accel, platform, channel and cpu override detection."""
    config = CvmConfig(accel="tcg", platform="none", guest_channel="serial", cpu="qemu64")
    assert decide(config, VMX) == ("tcg", "none", "serial", "qemu64")
    snp = CvmConfig(platform="amd-sev-snp", accel="kvm")
    assert decide(snp, BARE)[1:] == ("sev-snp", "serial", "EPYC-v4")


def test_impossible_combinations_are_config_errors() -> None:
    """A TEE without KVM, or -cpu host under TCG, is refused naming the key."""
    with pytest.raises(ConfigError, match=r"cvm\.platform"):
        decide(CvmConfig(platform="tdx", accel="tcg"), VMX)
    with pytest.raises(ConfigError, match=r"cvm\.cpu"):
        decide(CvmConfig(cpu="host", accel="tcg"), BARE)


def test_probe_reads_a_sysfs_layout(tmp_path: Path) -> None:
    """The probe reads cpu flags and TEE parameters from a /proc and /sys tree."""
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/cpuinfo").write_text("processor: 0\nflags\t\t: fpu svm sse\n")
    param = tmp_path / "sys/module/kvm_amd/parameters"
    param.mkdir(parents=True)
    (param / "sev_snp").write_text("Y\n")
    (tmp_path / "sys/class/net/br0/bridge").mkdir(parents=True)
    probe = HostProbe.read(tmp_path)
    assert "svm" in probe.cpu_flags
    assert probe.sev_snp and not probe.tdx
    assert not probe.kvm_usable  # no dev/kvm in the tree
    assert probe.bridges


def test_detect_finds_qemu_and_its_version() -> None:
    """On this machine QEMU is found on PATH and its version is read."""
    caps = detect(CvmConfig(), BARE)
    assert caps.qemu_path.endswith("qemu-system-x86_64")
    assert caps.qemu_version.count(".") >= 1
