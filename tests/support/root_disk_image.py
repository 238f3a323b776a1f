"""An image whose hda is a real (sparse, tiny) qcow2 root disk of a chosen virtual size."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

ROOTED_IMAGE = "rooted-0.5.0"


def make_root_disk_image(images: Path, name: str = ROOTED_IMAGE, size_mib: int = 1536) -> Path:
    """Placeholder kernel and initrd, and an hda made by qemu-img with ``size_mib`` MiB."""
    path = images / name
    path.mkdir(parents=True, exist_ok=True)
    (path / "bzImage").write_bytes(b"\0" * 16)
    (path / "initramfs.cpio.gz").write_bytes(b"\0" * 16)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path / "rootfs.qcow2"),
                    f"{size_mib}M"], check=True, timeout=60)
    (path / "metadata.json").write_text(json.dumps({
        "kernel": "bzImage", "initrd": "initramfs.cpio.gz", "hda": "rootfs.qcow2",
        "cmdline": "console=ttyS0 root=/dev/vda", "version": "0.5.0", "is_dev": True,
    }))
    return path
