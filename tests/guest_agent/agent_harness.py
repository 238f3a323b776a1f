"""Test peers for the guest agent's channels: the host side of both serial ports, and the agent
as a host process.

The same peers serve the host tests (the test listens, the agent connects: ``--agent-port`` and
``--host-api-port`` name Unix sockets) and the QEMU test (QEMU listens, the test connects).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from guest_agent import BOOT_MARKER
from guest_agent.framing import (
    REQUEST,
    RESPONSE,
    Frame,
    FrameDecoder,
    decode_request,
    decode_response,
    encode_frame,
    encode_request,
    encode_response,
)

REPO = Path(__file__).resolve().parents[2]
JSON = "application/json"


def listen_unix(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(4)
    return sock


def accept(listener: socket.socket, timeout: float) -> socket.socket:
    listener.settimeout(timeout)
    try:
        conn, _ = listener.accept()
    except TimeoutError:
        raise TimeoutError(f"nothing connected within {timeout} s") from None
    conn.settimeout(None)
    return conn


def connect_unix(path: Path, timeout: float) -> socket.socket:
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(path))
            return sock
        except OSError:
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


class FrameStream:
    """Frames over one connected socket, each read with a timeout."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.decoder = FrameDecoder()
        self._frames: list[Frame] = []
        self._lock = threading.Lock()

    def send_raw(self, data: bytes) -> None:
        with self._lock:
            self.sock.sendall(data)

    def send(self, kind: int, frame_id: int, payload: bytes) -> None:
        self.send_raw(encode_frame(kind, frame_id, payload))

    def next_frame(self, timeout: float) -> Frame:
        """The next whole frame; TimeoutError if none, EOFError if the peer closed."""
        deadline = time.monotonic() + timeout
        while not self._frames:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no frame within {timeout} s")
            ready, _, _ = select.select([self.sock], [], [], remaining)
            if not ready:
                continue
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("peer closed the stream")
            self._frames.extend(self.decoder.feed(data))
        return self._frames.pop(0)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


class GuestApiClient:
    """Calls the agent's GuestApi over frames, like the daemon's serial transport does."""

    def __init__(self, stream: FrameStream, first_id: int = 1000) -> None:
        self.stream = stream
        self.ids = itertools.count(first_id)
        self.strays: list[int] = []  # ids of answers nobody waited for (dropped, as the daemon does)

    def request_frame(self, method: str, frame_id: int, body: bytes = b"") -> bytes:
        return encode_frame(REQUEST, frame_id, encode_request(f"/api/{method}?json", JSON, body))

    def call(self, method: str, body: bytes = b"", timeout: float = 10.0) -> tuple[int, Any]:
        frame_id = next(self.ids)
        self.stream.send_raw(self.request_frame(method, frame_id, body))
        return self.wait_answer(frame_id, timeout)

    def wait_answer(self, frame_id: int, timeout: float = 10.0) -> tuple[int, Any]:
        deadline = time.monotonic() + timeout
        while True:
            frame = self.stream.next_frame(max(deadline - time.monotonic(), 0.001))
            if frame.kind != RESPONSE:
                raise AssertionError(f"agent sent a non-response frame {frame}")
            if frame.id != frame_id:
                self.strays.append(frame.id)
                continue
            status, ctype, body = decode_response(frame.payload)
            assert ctype == JSON
            return status, json.loads(body)


Responder = Callable[[str, bytes], tuple[int, bytes]]


def answer_null(path: str, body: bytes) -> tuple[int, bytes]:
    return 200, b"null"


class HostApiPeer:
    """The daemon's side of the host API port: answers every request, records notifications.

    ``connect`` gives the next connected socket (accept on a listener, or connect to QEMU's);
    after EOF it is called again. With ``noise`` each answer is preceded by garbage and an
    answer for an id nobody asked, which the agent must drop.
    """

    def __init__(
        self,
        connect: Callable[[], socket.socket],
        respond: Responder = answer_null,
        noise: bool = False,
    ) -> None:
        self._connect = connect
        self.respond = respond
        self.noise = noise
        self.calls: list[tuple[str, dict[str, Any] | None]] = []
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._stream: FrameStream | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> HostApiPeer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._stream is not None:
            self._stream.close()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                stream = FrameStream(self._connect())
            except OSError:
                if self._stop.wait(0.05):
                    return
                continue
            self._stream = stream
            try:
                self._serve(stream)
            except (EOFError, OSError):
                pass
            finally:
                stream.close()

    def _serve(self, stream: FrameStream) -> None:
        while not self._stop.is_set():
            try:
                frame = stream.next_frame(0.2)
            except TimeoutError:
                continue
            if frame.kind != REQUEST:
                continue
            path, _ctype, body = decode_request(frame.payload)
            request = json.loads(body) if body.strip() else None
            with self._cond:
                self.calls.append((path, request))
                self._cond.notify_all()
            status, answer = self.respond(path, body)
            if self.noise:
                stream.send_raw(b"\x7fVMM garbage \x00\xff")
                stream.send(RESPONSE, frame.id + 7, encode_response(500, JSON, b'{"error":"stray"}'))
            stream.send(RESPONSE, frame.id, encode_response(status, JSON, answer))

    def notifications(self) -> list[tuple[str, str]]:
        with self._cond:
            return [
                (str(req["event"]), str(req["payload"]))
                for path, req in self.calls
                if path.split("?")[0] == "/api/Notify" and isinstance(req, dict)
            ]

    def wait_for(self, event: str, payload: str | None = None, timeout: float = 30.0) -> str:
        """The payload of the first matching notification; TimeoutError if none comes."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for got_event, got_payload in self.notifications():
                    if got_event == event and payload in (None, got_payload):
                        return got_payload
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no {event} {payload!r} within {timeout} s: {self.calls}")
                self._cond.wait(remaining)


class AgentProcess:
    """``python -m guest_agent`` on the host, with every system action replaced or disabled."""

    def __init__(self, workdir: Path, *extra: str, share: Path | None = None) -> None:
        self.workdir = workdir
        self.console = workdir / "console.log"
        self.share = share if share is not None else workdir / "share"
        self.share.mkdir(parents=True, exist_ok=True)
        # A console file may hold earlier runs (a restart within the same boot): read past them.
        self._console_start = self.console.stat().st_size if self.console.exists() else 0
        argv = [
            sys.executable, "-m", "guest_agent",
            "--console", str(self.console), "--share-dir", str(self.share), "--no-mount",
            "--no-power-button", "--no-poweroff", "--no-vsock",
            "--http-host", "127.0.0.1", "--http-port", "0", "--api-tcp", "127.0.0.1:0",
            "--state-dir", str(workdir / "state"), "--run-dir", str(workdir / "run"),
            *extra,
        ]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen(
            argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
        )

    def console_text(self) -> str:
        """What this run printed on the console."""
        if not self.console.exists():
            return ""
        with self.console.open("rb") as f:
            f.seek(self._console_start)
            return f.read().decode(errors="replace")

    def wait_console(self, pattern: str, timeout: float = 30.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while True:
            match = re.search(pattern, self.console_text(), re.MULTILINE)
            if match:
                return match
            if self.proc.poll() is not None:
                stderr = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise AssertionError(f"agent exited with {self.proc.returncode}: {stderr}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {pattern!r} on the console within {timeout} s")
            time.sleep(0.02)

    def wait_booted(self, timeout: float = 30.0) -> None:
        self.wait_console(f"^{re.escape(BOOT_MARKER)}$", timeout)

    @property
    def api_port(self) -> int:
        return int(self.wait_console(r"^vmm-guest: guest api on tcp 127\.0\.0\.1:(\d+)$").group(1))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        if self.proc.stderr:
            self.proc.stderr.close()


@contextlib.contextmanager
def running_agent(workdir: Path, *extra: str, share: Path | None = None) -> Iterator[AgentProcess]:
    agent = AgentProcess(workdir, *extra, share=share)
    try:
        yield agent
    finally:
        agent.stop()
