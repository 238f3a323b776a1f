"""Small file primitives the supervisor relies on for crash safety."""

from __future__ import annotations

import os

from vmm.core.fsutil import atomic_write

__all__ = ["atomic_write", "open_append"]


def open_append(path: str) -> int:
    """Open a child's log for appending; an empty path means the output is discarded.

    O_APPEND is what keeps in-place truncation (logrotate's copytruncate, or the daemon's own
    rotation) working: every write lands at the current end, so the file does not grow back a
    hole of the truncated size.
    """
    if not path:
        return os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
