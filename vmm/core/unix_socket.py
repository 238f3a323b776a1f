"""Binding a private (0600) Unix socket: shared by the API listener and the supervisor."""

from __future__ import annotations

import logging
import os
import socket
import stat
from pathlib import Path

log = logging.getLogger(__name__)


class SocketPathTaken(Exception):
    """The path holds something we must not replace, or binding it failed; says which."""


def is_live(path: Path) -> bool:
    """Whether something accepts connections on the socket at ``path``."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2.0)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except OSError:
        # Something is there but behaves oddly (e.g. a full backlog); do not steal it.
        return True
    finally:
        probe.close()
    return True


def bind_private(path: Path, backlog: int = 128) -> socket.socket:
    """Bind and listen on a 0600 Unix socket; replace a stale socket file, never a live one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(mode):
            raise SocketPathTaken(f"{path} exists and is not a socket; not replacing it")
        if is_live(path):
            raise SocketPathTaken(f"another process is already listening on {path}")
        log.info("removing stale socket %s", path)
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # The umask makes the socket 0600 from the moment it exists: bind-then-chmod would leave a
    # window in which any local user could connect.
    old_umask = os.umask(0o177)
    try:
        sock.bind(str(path))
    except OSError as exc:
        sock.close()
        raise SocketPathTaken(f"cannot bind {path}: {exc.strerror}") from None
    finally:
        os.umask(old_umask)
    path.chmod(0o600)
    sock.listen(backlog)
    sock.set_inheritable(False)
    return sock
