"""``--wait``: follow a VM's boot by polling GetInfo until the guest says ``done``.

The progress is one line, rewritten in place on a terminal and printed once per change
otherwise (so logs and tests read it as a list of steps). The wait ends with:

- ``done`` from the guest: success;
- a ``boot_error``: failure, with the guest's reason;
- the VM no longer running (exited or stopped while booting): failure;
- the timeout: failure, naming the last step seen.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from vmm.cli_client.client import CliError

POLL_INTERVAL = 0.5
DONE = "done"


class ProgressLine:
    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.last = ""

    def show(self, text: str) -> None:
        if text == self.last:
            return
        self.last = text
        if self.tty:
            self.stream.write(f"\r\x1b[K{text}")
        else:
            self.stream.write(f"{text}\n")
        self.stream.flush()

    def end(self) -> None:
        if self.tty and self.last:
            self.stream.write("\n")
            self.stream.flush()


def wait_for_boot(get_info: Callable[[], dict[str, Any]], vm_id: str, timeout: float, *,
                  stream: TextIO | None = None,
                  clock: Callable[[], float] = time.monotonic,
                  sleep: Callable[[float], None] = time.sleep) -> None:
    line = ProgressLine(stream or sys.stdout)
    deadline = clock() + timeout
    progress = ""
    try:
        while True:
            info = get_info()
            progress = info.get("boot_progress") or ""
            error = info.get("boot_error") or ""
            status = info.get("status") or ""
            line.show(f"{vm_id}: {status} {progress}".rstrip())
            if error:
                raise CliError(f"boot failed: {error}")
            if progress == DONE:
                return
            if status in ("exited", "stopped", "removing"):
                raise CliError(f"VM {vm_id} is {status} before its boot finished"
                               f" (last step: {progress or 'none'})")
            if clock() >= deadline:
                raise CliError(f"timed out after {timeout:.0f} s waiting for {vm_id} to boot"
                               f" (last step: {progress or 'none'})")
            sleep(POLL_INTERVAL)
    finally:
        line.end()
