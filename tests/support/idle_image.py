"""A guest image whose kernel halts at once: real QEMU processes that cost no CPU.

The "kernel" is a 36-byte multiboot image (QEMU loads multiboot kernels itself): a header with
the a.out-kludge load addresses, then ``cli; hlt; jmp hlt``. Under TCG a halted vCPU with
interrupts off is idle, so tests that need many VMs that *run* (lifecycle, limits,
auto-restart, log rotation, concurrency) can have them without booting Linux, and without
breaking the "at most two VMs boot at once" rule on a 2-core machine.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

MULTIBOOT_MAGIC = 0x1BADB002
AOUT_KLUDGE = 1 << 16
LOAD_AT = 0x100000
IDLE_IMAGE = "idle-0.5.0"


def idle_kernel() -> bytes:
    checksum = (-(MULTIBOOT_MAGIC + AOUT_KLUDGE)) & 0xFFFFFFFF
    header = struct.pack(
        "<8I",
        MULTIBOOT_MAGIC, AOUT_KLUDGE, checksum,
        LOAD_AT,       # header_addr: the header is the first thing loaded
        LOAD_AT,       # load_addr
        0,             # load_end_addr: the whole file
        0,             # bss_end_addr: no bss
        LOAD_AT + 32,  # entry: right after the 32-byte header
    )
    return header + bytes([0xFA, 0xF4, 0xEB, 0xFD])  # cli; hlt; jmp back to hlt


def make_idle_image(images: Path, name: str = IDLE_IMAGE) -> Path:
    path = images / name
    path.mkdir(parents=True, exist_ok=True)
    (path / "idle.bin").write_bytes(idle_kernel())
    (path / "initrd.img").write_bytes(b"\0" * 512)  # loaded as a multiboot module, never read
    (path / "metadata.json").write_text(json.dumps({
        "kernel": "idle.bin", "initrd": "initrd.img", "cmdline": "idle",
        "version": "0.5.0", "is_dev": True, "shared_ro": True,
    }))
    return path
