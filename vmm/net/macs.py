"""Stable NIC MAC addresses derived from the VM id (dstack's algorithm, reference §9).

A MAC must survive restarts and daemon moves without being stored anywhere, and must match what
dstack derives for the same VM so DHCP leases and bridge filters keep working across the two.
"""

from __future__ import annotations

import hashlib

MAX_PREFIX_BYTES = 3


def derive_mac(vm_id: str, index: int, prefix: bytes = b"") -> str:
    """The MAC of NIC ``index``: ``prefix`` bytes, then sha256 bytes, locally administered."""
    if index < 0:
        raise ValueError(f"NIC index must be >= 0, got {index}")
    if len(prefix) > MAX_PREFIX_BYTES:
        raise ValueError(f"MAC prefix is at most {MAX_PREFIX_BYTES} bytes, got {len(prefix)}")
    # NIC 0 hashes the bare id so single-NIC VMs keep the MAC they had before multi-NIC support.
    seed = vm_id if index == 0 else f"{vm_id}:{index}"
    raw = bytearray(prefix + hashlib.sha256(seed.encode()).digest()[: 6 - len(prefix)])
    # Unicast, locally administered: never collides with a vendor-assigned address.
    raw[0] = (raw[0] & 0xFE) | 0x02
    return ":".join(f"{b:02x}" for b in raw)
