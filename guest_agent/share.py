"""The host share: a 9p (virtio) export the VMM fills with app-compose.json and friends."""

import hashlib
from pathlib import Path

from guest_agent import system

SHARE_TAG = "host-shared"
SHARE_DIR = Path("/dstack")
COMPOSE_FILE = "app-compose.json"
VIRTIO_9P_DRIVER = Path("/sys/bus/virtio/drivers/9pnet_virtio")
MOUNT_OPTIONS = "trans=virtio,version=9p2000.L,msize=131072"


def read_mount_tags(driver_dir: Path = VIRTIO_9P_DRIVER) -> list[str]:
    """Return the mount tags of the virtio 9p devices bound to the driver, in sysfs order."""
    tags: list[str] = []
    if not driver_dir.is_dir():
        return tags
    for device in sorted(driver_dir.glob("virtio*")):
        try:
            raw = (device / "mount_tag").read_bytes()
        except OSError:
            continue
        tags.append(raw.split(b"\0", 1)[0].decode("utf-8", "replace").strip())
    return tags


def is_mounted(target: Path, mounts: Path = Path("/proc/mounts")) -> bool:
    try:
        lines = mounts.read_text().splitlines()
    except OSError:
        return False
    wanted = str(target)
    return any(len(f := line.split()) > 1 and f[1] == wanted for line in lines)


def mount_share(
    target: Path = SHARE_DIR,
    tag: str = SHARE_TAG,
    driver_dir: Path = VIRTIO_9P_DRIVER,
) -> bool:
    """Mount the share read-only at ``target``.

    Returns False when no virtio 9p device carries ``tag``; raises OSError when the mount fails.
    """
    if tag not in read_mount_tags(driver_dir):
        return False
    if is_mounted(target):
        return True
    target.mkdir(parents=True, exist_ok=True)
    system.mount(tag, target, "9p", system.MS_RDONLY, MOUNT_OPTIONS)
    return True


def compose_sha256(share_dir: Path = SHARE_DIR) -> str | None:
    """Hex sha256 of ``app-compose.json`` in the share, or None if there is none."""
    try:
        data = (share_dir / COMPOSE_FILE).read_bytes()
    except OSError:
        return None
    return hashlib.sha256(data).hexdigest()
