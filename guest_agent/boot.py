"""The boot sequence: host share, then the console report the host waits for.

The agent is restarted by the image's init if it dies; a restart must not report boot again
(the VMM would see its boot progress go backwards, and the marker is printed once per boot).
A file in /run, a tmpfs that each boot starts empty, records that boot was reported.
"""

import contextlib
from pathlib import Path

from guest_agent import BOOT_MARKER, share
from guest_agent.console import Console


class BootState:
    """What the guest learned while booting."""

    __slots__ = ("compose_sha256", "error", "share_mounted")

    def __init__(self, share_mounted: bool, compose_sha256: str | None, error: str | None = None) -> None:
        self.share_mounted = share_mounted
        self.compose_sha256 = compose_sha256
        self.error = error  # why the share could not be mounted, for boot.error


def prepare(
    console: Console,
    share_dir: Path,
    mount: bool,
    tag: str = share.SHARE_TAG,
) -> BootState:
    """Mount the host share (unless ``mount`` is False) and hash the compose file."""
    mounted = False
    error = None
    if mount:
        try:
            mounted = share.mount_share(share_dir, tag)
        except OSError as exc:
            error = f"host share {tag!r} mount failed: {exc}"
            console.log(error)
        else:
            if not mounted:
                console.log(f"host share {tag!r} absent; continuing without it")
    return BootState(mounted, share.compose_sha256(share_dir), error)


def compose_line(state: BootState) -> str:
    return f"compose-sha256={state.compose_sha256 or 'none'}"


def report_ready(console: Console, state: BootState) -> None:
    """Print the compose hash line and then the boot marker."""
    console.log(compose_line(state))
    console.line(BOOT_MARKER)


REPORTED_FILE = "boot-reported"
RUN_DIR = Path("/run/vmm-guest")


def already_reported(run_dir: Path) -> bool:
    """Whether an earlier run of the agent in this boot already reported boot."""
    return (run_dir / REPORTED_FILE).exists()


def mark_reported(run_dir: Path) -> None:
    with contextlib.suppress(OSError):
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / REPORTED_FILE).touch()
