"""MAC derivation: dstack's test vector, the prefix and the locally-administered bit."""

from __future__ import annotations

import pytest

from vmm.net.macs import derive_mac


def test_dstack_test_vector() -> None:
    """The id "vm-123" without a prefix gives dstack's published MACs for NIC 0 and NIC 1."""
    assert derive_mac("vm-123", 0) == "96:b1:d8:b9:08:e6"
    assert derive_mac("vm-123", 1) == "c6:74:2c:65:14:b9"


def test_prefix_bytes_come_first() -> None:
    """The prefix fills the leading bytes and the raw hash the rest, six bytes in all."""
    # sha256("vm-123") starts 97 b1 d8; only the first byte of the MAC has its bits adjusted.
    assert derive_mac("vm-123", 0, bytes.fromhex("5254ab")) == "52:54:ab:97:b1:d8"


def test_prefix_first_byte_is_made_local_unicast() -> None:
    """The multicast bit is cleared and the local bit set even on a prefix byte."""
    assert derive_mac("x", 0, b"\x01\x02").startswith("02:02:")


def test_every_mac_is_local_unicast() -> None:
    """Bit 0 of the first byte is 0 and bit 1 is 1 for any id and index."""
    for index in range(8):
        first = int(derive_mac(f"vm-{index}", index).split(":")[0], 16)
        assert first & 0x03 == 0x02


def test_bad_arguments_are_refused() -> None:
    """A prefix over 3 bytes or a negative index is a ValueError."""
    with pytest.raises(ValueError, match="at most 3"):
        derive_mac("vm", 0, b"\0\0\0\0")
    with pytest.raises(ValueError, match="index"):
        derive_mac("vm", -1)
