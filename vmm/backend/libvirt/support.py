"""What the libvirt backend cannot run on a given host, named feature by feature.

Pure like the domain builder: the libvirt version and whether /dev/vhost-vsock exists come in as
arguments. Each entry names the feature (a config key or manifest field where there is one) and
ends with "(libvirt backend)", so a refusal says both what and where.
"""

from __future__ import annotations

import re

from vmm.backend.base import LaunchSpec
from vmm.backend.qemu.argv import effective_tee
from vmm.core.config import Config, ProductConfig
from vmm.net.nics import ResolvedNic

SEV_SNP_MIN_LIBVIRT = (10, 5, 0)
_BIOS_DATE = re.compile(r"^\d{2}/\d{2}/(\d{2}|\d{4})$")
_BIOS_RELEASE = re.compile(r"^\d+\.\d+$")


def libvirt_version_tuple(encoded: int) -> tuple[int, int, int]:
    """Libvirt's ``major * 1,000,000 + minor * 1,000 + release`` into a tuple."""
    return encoded // 1_000_000, encoded // 1_000 % 1_000, encoded % 1_000


def unsupported_features(
    spec: LaunchSpec, config: Config, libvirt_version: tuple[int, int, int], *,
    vhost_vsock: bool = True,
) -> list[str]:  # fmt: skip
    """What this VM asks for that the libvirt backend cannot run here; each names the feature."""
    version = ".".join(map(str, libvirt_version))
    cvm = config.cvm
    problems = []
    tee = effective_tee(spec)
    if tee == "tdx":
        problems.append(f"TDX: libvirt {version} has no <launchSecurity type='tdx'> "
                        "(libvirt backend)")  # fmt: skip
    elif tee == "sev-snp":
        reason = (f"libvirt {version} has no <launchSecurity type='sev-snp'> (added in 10.5.0)"
                  if libvirt_version < SEV_SNP_MIN_LIBVIRT
                  else "the libvirt backend does not build SEV-SNP domains yet")  # fmt: skip
        problems.append(f"SEV-SNP: {reason} (libvirt backend)")
    if spec.host.channel == "vsock" and not vhost_vsock:
        problems.append("vsock guest channel: libvirt's <vsock> needs /dev/vhost-vsock, which "
                        "this host lacks (libvirt backend; set cvm.guest_channel = \"serial\")")  # fmt: skip
    if cvm.user:
        problems.append(f"cvm.user = {cvm.user!r}: libvirt runs QEMU as qemu.conf's user, not "
                        "through sudo (libvirt backend)")  # fmt: skip
    problems += _product_problems(cvm.product)
    for nic in spec.resolved_nics(cvm.networking):
        problems += _nic_problems(nic)
    return problems


def _product_problems(product: ProductConfig) -> list[str]:
    problems = []
    if product.product_uuid:
        problems.append("cvm.product.product_uuid: libvirt makes the SMBIOS system UUID the "
                        "domain UUID, which must differ per VM (libvirt backend)")  # fmt: skip
    if product.bios_date and not _BIOS_DATE.match(product.bios_date):
        problems.append(f"cvm.product.bios_date = {product.bios_date!r}: libvirt accepts only "
                        "mm/dd/yy or mm/dd/yyyy (libvirt backend)")  # fmt: skip
    if product.bios_release and not _BIOS_RELEASE.match(product.bios_release):
        problems.append(f"cvm.product.bios_release = {product.bios_release!r}: libvirt accepts "
                        "only major.minor (libvirt backend)")  # fmt: skip
    return problems


def _nic_problems(nic: ResolvedNic) -> list[str]:
    where = f"networks[{nic.index}]"
    mode = str(nic.mode)
    if mode == "passt":
        return [f"{where}: passt networking: Debian's libvirt 9.0 is built without passt "
                "(libvirt backend)"]  # fmt: skip
    if mode not in ("user", "bridge", "custom"):
        return [f"{where}: networking mode {mode!r} (libvirt backend)"]
    if mode == "custom":
        kind = nic.netdev.split(",", 1)[0]
        options = nic.netdev.split(",")[1:]
        spawns = kind == "bridge" or (kind == "tap" and any(
            o.startswith(("script=", "downscript=")) and o.split("=", 1)[1] != "no"
            for o in options))  # fmt: skip
        if spawns:
            return [f"{where}: custom netdev {kind!r} makes QEMU spawn a helper, which libvirt's "
                    "seccomp sandbox (spawn=deny) forbids (libvirt backend)"]  # fmt: skip
    return []
