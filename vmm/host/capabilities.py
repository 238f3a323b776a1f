"""What this host can do: accelerator, TEE platform, guest channel, QEMU binary and version.

Detected once at start from /proc, /sys and /dev, then combined with the config: an explicit
config value wins; ``auto`` picks KVM only where the CPU has vmx/svm and /dev/kvm opens, a TEE only
where the kernel reports it, and vsock only where /dev/vhost-vsock exists. GetMeta reports the
result so an operator can see what was chosen.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from vmm.core.config import CvmConfig
from vmm.core.exceptions import ConfigError

log = logging.getLogger(__name__)

Accel = Literal["kvm", "tcg"]
Tee = Literal["tdx", "sev-snp", "none"]
Channel = Literal["vsock", "serial"]


@dataclass(frozen=True)
class HostProbe:
    """Raw facts about the host, separated from policy so tests can supply their own."""

    cpu_flags: frozenset[str]
    kvm_usable: bool
    tdx: bool
    sev_snp: bool
    vhost_vsock: bool
    bridges: bool

    @classmethod
    def read(cls, root: Path = Path("/")) -> HostProbe:
        flags: set[str] = set()
        try:
            for line in (root / "proc/cpuinfo").read_text().splitlines():
                if line.startswith("flags"):
                    flags.update(line.partition(":")[2].split())
                    break
        except OSError:
            pass
        return cls(
            cpu_flags=frozenset(flags),
            kvm_usable=_device_opens(root / "dev/kvm"),
            tdx=_param_enabled(root / "sys/module/kvm_intel/parameters/tdx"),
            sev_snp=_param_enabled(root / "sys/module/kvm_amd/parameters/sev_snp"),
            vhost_vsock=(root / "dev/vhost-vsock").exists(),
            bridges=any((root / "sys/class/net").glob("*/bridge")),
        )


@dataclass(frozen=True)
class HostCapabilities:
    accel: Accel
    tee: Tee
    channel: Channel
    cpu_model: str
    qemu_path: str
    qemu_version: str
    bridges: bool


def decide(config: CvmConfig, probe: HostProbe) -> tuple[Accel, Tee, Channel, str]:
    """Apply the config to the probe: (accelerator, TEE, guest channel, CPU model)."""
    hw_virt = bool(probe.cpu_flags & {"vmx", "svm"})
    if config.accel == "auto":
        accel: Accel = "kvm" if hw_virt and probe.kvm_usable else "tcg"
    else:
        accel = config.accel
    platform = "sev-snp" if config.platform == "amd-sev-snp" else config.platform
    if platform == "auto":
        tee: Tee = "tdx" if probe.tdx else "sev-snp" if probe.sev_snp else "none"
    else:
        tee = platform
    if tee != "none" and accel != "kvm":
        raise ConfigError(f"`cvm.platform`: {tee} needs KVM, but the accelerator is {accel}")
    if config.guest_channel == "auto":
        channel: Channel = "vsock" if probe.vhost_vsock else "serial"
    else:
        channel = config.guest_channel
    cpu = config.cpu or ("EPYC-v4" if tee == "sev-snp" else "host" if accel == "kvm" else "max")
    if accel == "tcg" and cpu == "host":
        raise ConfigError("`cvm.cpu`: \"host\" requires KVM; use e.g. \"max\" under TCG")
    return accel, tee, channel, cpu


def detect(config: CvmConfig, probe: HostProbe | None = None) -> HostCapabilities:
    probe = probe or HostProbe.read()
    accel, tee, channel, cpu = decide(config, probe)
    qemu_path = config.qemu_path or shutil.which("qemu-system-x86_64") or ""
    return HostCapabilities(
        accel=accel,
        tee=tee,
        channel=channel,
        cpu_model=cpu,
        qemu_path=qemu_path,
        qemu_version=qemu_version(qemu_path) if qemu_path else "",
        bridges=probe.bridges,
    )


def qemu_version(qemu_path: str) -> str:
    """The word after "version" in ``qemu --version``, cut at ``+`` (as dstack does)."""
    try:
        out = subprocess.run(
            [qemu_path, "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("cannot run %s --version: %s", qemu_path, exc)
        return ""
    match = re.search(r"version\s+(\S+)", out)
    return match.group(1).split("+")[0] if match else ""


def _device_opens(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


def _param_enabled(path: Path) -> bool:
    try:
        return path.read_text().strip() in ("Y", "y", "1")
    except OSError:
        return False
