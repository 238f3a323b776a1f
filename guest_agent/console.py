"""Line output to the serial console, shared by every part of the agent."""

import os
import sys
import threading
from pathlib import Path

from guest_agent import CONSOLE_PREFIX

DEFAULT_CONSOLE = Path("/dev/console")


class Console:
    """Writes whole lines to the console device (or a file, for tests), one write per line."""

    def __init__(self, path: Path = DEFAULT_CONSOLE) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._fd: int | None = None
        try:
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOCTTY, 0o644)
        except OSError as exc:
            sys.stderr.write(f"{CONSOLE_PREFIX}: cannot open {path}: {exc}; using stderr\n")

    def line(self, text: str) -> None:
        """Write ``text`` as one line, exactly as given."""
        data = (text + "\n").encode("utf-8", "replace")
        with self._lock:
            if self._fd is None:
                sys.stderr.buffer.write(data)
                sys.stderr.flush()
                return
            view = memoryview(data)
            while view:
                written = os.write(self._fd, view)
                view = view[written:]

    def log(self, message: str) -> None:
        """Write ``vmm-guest: <message>``."""
        self.line(f"{CONSOLE_PREFIX}: {message}")

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
