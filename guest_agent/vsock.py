"""Whether this machine is a guest with a working vsock device.

The vsock core module creates /dev/vsock and the virtio transport registers itself whether or
not QEMU gave the VM a vhost-vsock device; only with the device does the local CID become a
real guest CID (3 or more). Without it the ioctl answers VMADDR_CID_ANY, and the daemon then
talks to this guest over virtio-serial instead.
"""

import contextlib
import fcntl
import os
import socket
import struct
from pathlib import Path

VSOCK_DEV = Path("/dev/vsock")
VMADDR_CID_ANY = 0xFFFFFFFF
VMADDR_CID_HOST = 2
IOCTL_VM_SOCKETS_GET_LOCAL_CID = 0x7B9  # _IO(7, 0xb9)


def guest_cid(dev: Path = VSOCK_DEV) -> int | None:
    """The guest's vsock CID, or None when vsock cannot reach a host from here."""
    if not hasattr(socket, "AF_VSOCK"):
        return None
    try:
        fd = os.open(dev, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        raw = fcntl.ioctl(fd, IOCTL_VM_SOCKETS_GET_LOCAL_CID, b"\0" * 4)
    except OSError:
        return None
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
    (cid,) = struct.unpack("I", raw)
    if cid == VMADDR_CID_ANY or cid <= VMADDR_CID_HOST:
        return None
    return int(cid)
