"""Small file primitives the supervisor relies on for crash safety."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` so a reader sees the old or the new file, never a torn one.

    The directory is fsynced too: a rename that is not durable could bring back the old table
    after a power loss, and with it pids that were already reaped.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def open_append(path: str) -> int:
    """Open a child's log for appending; an empty path means the output is discarded.

    O_APPEND is what keeps in-place truncation (logrotate's copytruncate, or the daemon's own
    rotation) working: every write lands at the current end, so the file does not grow back a
    hole of the truncated size.
    """
    if not path:
        return os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
