"""Host ports of a VM's forwards, checked free on this host right before a boot."""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterable

from vmm.core.exceptions import Conflict
from vmm.model.manifest import PortMap


def check_host_ports_free(ports: Iterable[PortMap]) -> None:
    """Refuse to boot into a certain failure: QEMU exits if a forwarded host port is taken."""
    for port in ports:
        family = socket.AF_INET6 if ":" in port.address else socket.AF_INET
        kind = socket.SOCK_STREAM if port.protocol == "tcp" else socket.SOCK_DGRAM
        with socket.socket(family, kind) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((port.address, port.host_port))
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
                raise Conflict(
                    f"host port {port.protocol} {port.address}:{port.host_port} "
                    "is in use by another process"
                ) from None
