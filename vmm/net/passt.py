"""passt, the user-mode network of a ``passt`` NIC: one process per VM beside its QEMU.

QEMU connects to passt's Unix socket (``-netdev stream``); passt gives the guest DHCP and
forwards the NIC's mappings as ``-t``/``-u`` specs. Measured with Debian 12's passt
(0.0~git20230309, reference networking §1): ``--map-host-loopback`` and ``--map-guest-addr``
are refused, so they are never emitted; ``-1`` (exit when QEMU disconnects) makes it exit before
QEMU has connected, so it is not used either: the VM's owner stops passt with the VM. Started as
root, passt switches to ``nobody`` before binding its socket, which then cannot reach a VM
directory under a private run path: ``--runas`` keeps the daemon's user (QEMU's, unless
``cvm.user``), and passt still confines itself (namespaces, seccomp) as it always does.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from vmm.net.nics import ResolvedNic

PASST_DIR = "passt"
SOCKET = "passt.sock"
LOG = "passt.log"


def passt_binary() -> str:
    return shutil.which("passt") or ""


def process_id(vm_id: str) -> str:
    """The supervisor id of a VM's passt (dstack's ``passt-<vm id>``)."""
    return f"passt-{vm_id}"


def socket_path(workdir: Path) -> Path:
    return workdir / PASST_DIR / SOCKET


def passt_argv(binary: str, workdir: Path, nic: ResolvedNic, runas: str = "") -> list[str]:
    """The passt command line for ``nic``: socket, log, foreground, one spec per mapping."""
    argv = [binary, "--socket", str(socket_path(workdir)), "--log-file", str(workdir / LOG), "-f"]
    if runas:
        argv += ["--runas", runas]
    for port in nic.ports:
        flag = "-t" if port.protocol == "tcp" else "-u"
        argv += [flag, f"{port.address}/{port.host_port}:{port.vm_port}"]
    return argv


def prepare_dir(workdir: Path) -> None:
    """The socket's directory, with no stale socket in it (QEMU would connect to nothing)."""
    (workdir / PASST_DIR).mkdir(exist_ok=True)
    socket_path(workdir).unlink(missing_ok=True)


def daemon_user() -> str:
    """``uid:gid`` of this process, for ``--runas``."""
    return f"{os.getuid()}:{os.getgid()}"
