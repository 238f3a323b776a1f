"""File primitives for crash safety, shared by the daemon and the supervisor.

An OSError raised here names the file the caller asked to write (``filename``), even when the
failing call was a ``write`` or ``fsync``, which name none: the caller can tell a client which
file did not fit.
"""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path


def fsync_dir(path: Path) -> None:
    dir_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_synced(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Create or truncate the scratch file ``path`` with ``data`` and fsync it; removed on failure."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            path.unlink()
        _name_file(exc, path)
        raise


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` so a reader sees the old or the new file, never a torn one.

    The directory is fsynced too: a rename that is not durable could bring back the old
    content after a power loss.
    """
    # A scratch name of this thread's own: two threads writing the same file at once (an RPC
    # and a guest's notice recording the same VM state) must not truncate or rename each
    # other's scratch file; the last rename wins whole.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        write_synced(tmp, data, mode)
        tmp.replace(path)
        fsync_dir(path.parent)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        _name_file(exc, path)
        raise


def _name_file(exc: BaseException, path: Path) -> None:
    if isinstance(exc, OSError):
        exc.filename, exc.filename2 = os.fspath(path), None
