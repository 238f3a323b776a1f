"""The boot sequence: host share, then the console report the host waits for."""

from pathlib import Path

from guest_agent import BOOT_MARKER, share
from guest_agent.console import Console


class BootState:
    """What the guest learned while booting."""

    __slots__ = ("compose_sha256", "share_mounted")

    def __init__(self, share_mounted: bool, compose_sha256: str | None) -> None:
        self.share_mounted = share_mounted
        self.compose_sha256 = compose_sha256


def prepare(
    console: Console,
    share_dir: Path,
    mount: bool,
    tag: str = share.SHARE_TAG,
) -> BootState:
    """Mount the host share (unless ``mount`` is False) and hash the compose file."""
    mounted = False
    if mount:
        try:
            mounted = share.mount_share(share_dir, tag)
        except OSError as exc:
            console.log(f"host share {tag!r} mount failed: {exc}")
        else:
            if not mounted:
                console.log(f"host share {tag!r} absent; continuing without it")
    return BootState(share_mounted=mounted, compose_sha256=share.compose_sha256(share_dir))


def compose_line(state: BootState) -> str:
    return f"compose-sha256={state.compose_sha256 or 'none'}"


def report_ready(console: Console, state: BootState) -> None:
    """Print the compose hash line and then the boot marker."""
    console.log(compose_line(state))
    console.line(BOOT_MARKER)
