"""A VM's disk: a qcow2 overlay over the image's root disk, grown with qemu-img.

Every backend runs QEMU, so every backend makes and grows its disks the same way.
"""

from __future__ import annotations

from pathlib import Path

from vmm.backend.base import LaunchSpec
from vmm.core.exceptions import Unavailable
from vmm.core.host_tool import run_host_tool
from vmm.model.workdir import Workdir

QEMU_IMG_TIMEOUT = 120.0


async def create_if_missing(spec: LaunchSpec) -> None:
    if not Workdir(spec.workdir).disk.exists():
        await run_tool(qemu_img_create_argv(spec), QEMU_IMG_TIMEOUT)


async def grow(disk: Path, size_gb: int) -> None:
    await run_tool(["qemu-img", "resize", str(disk), f"{size_gb}G"], QEMU_IMG_TIMEOUT)


def qemu_img_create_argv(spec: LaunchSpec, qemu_img: str = "qemu-img") -> list[str]:
    """Create ``hda.img`` (qcow2), backed by the image's hda when it has one."""
    argv = [qemu_img, "create", "-f", "qcow2"]
    if spec.image.hda is not None:
        argv += ["-o", f"backing_file={_qemu_opt(spec.image.hda)}", "-o", "backing_fmt=qcow2"]
    return [*argv, str(Workdir(spec.workdir).disk), f"{spec.manifest.disk_size}G"]


def _qemu_opt(value: object) -> str:
    """A value inside a QEMU -o option: commas doubled, as its option parser requires."""
    return str(value).replace(",", ",,")


async def run_tool(argv: list[str], timeout: float) -> None:
    """Run a host tool to completion; Unavailable with its output's tail if it fails or hangs."""
    try:
        status, output = await run_host_tool(argv, timeout, merge_output=True)
    except TimeoutError:
        raise Unavailable(f"{argv[0]} timed out after {timeout:g}s") from None
    if status != 0:
        raise Unavailable(f"{' '.join(argv[:3])} failed: {output.decode(errors='replace')[-500:]}")
