"""A small blocking QMP client for tests (unix socket, every call with a timeout)."""

import json
import socket
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Self


class QMPError(Exception):
    pass


class QMPClient:
    """Connects (retrying until ``timeout`` while QEMU creates the socket) and negotiates."""

    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        self.timeout = timeout
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                sock.connect(str(path))
                break
            except OSError:
                sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self._sock = sock
        self._file = sock.makefile("rb")
        self.events: list[dict[str, Any]] = []
        greeting = self._read()
        if "QMP" not in greeting:
            self.close()
            raise QMPError(f"unexpected greeting: {greeting}")
        self.execute("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        line = self._file.readline()
        if not line:
            raise QMPError("QMP connection closed")
        message: dict[str, Any] = json.loads(line)
        return message

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        self._sock.sendall(json.dumps(request).encode() + b"\n")
        while True:
            reply = self._read()
            if "event" in reply:
                self.events.append(reply)
                continue
            if "error" in reply:
                raise QMPError(f"{command}: {reply['error']}")
            return reply.get("return")

    def hmp(self, command_line: str) -> str:
        """Run a human monitor command through QMP and return its text."""
        return str(self.execute("human-monitor-command", {"command-line": command_line}))

    def close(self) -> None:
        self._file.close()
        self._sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
