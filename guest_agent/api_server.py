"""Serving the GuestApi over HTTP and over frames; both call the same ``GuestApi.handle``.

HTTP/1.1 runs on stream listeners (vsock port 8000, optionally TCP); frames run on the
virtio-serial port org.vmm.guest-agent.
"""

import socket
import socketserver
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from guest_agent.channel import PortChannel, frames_of
from guest_agent.framing import (
    REQUEST,
    RESPONSE,
    Frame,
    FrameError,
    decode_request,
    encode_frame,
    encode_response,
)
from guest_agent.guest_api import GuestApi, Reply, error

AGENT_PORT_NAME = "org.vmm.guest-agent"
VSOCK_PORT = 8000
MAX_REQUEST_BODY = 1024 * 1024
SEND_TIMEOUT = 5.0
JSON = "application/json"

Log = Callable[[str], None]


class _ApiHandler(BaseHTTPRequestHandler):
    server: "ApiHTTPServer"
    server_version = "vmm-guest-agent"
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self._serve(b"")

    def do_POST(self) -> None:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            self._send(error("chunked request bodies are not supported"))
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_REQUEST_BODY:
            self.close_connection = True
            self._send(error("bad Content-Length"))
            return
        self._serve(self.rfile.read(length) if length else b"")

    def _serve(self, body: bytes) -> None:
        self._send(self.server.api.handle(self.path, body))

    def _send(self, reply: Reply) -> None:
        self.send_response(reply.status)
        self.send_header("Content-Type", JSON)
        self.send_header("Content-Length", str(len(reply.body)))
        self.end_headers()
        self.wfile.write(reply.body)
        self.wfile.flush()
        if reply.after is not None:
            reply.after()

    def log_message(self, format: str, *args: object) -> None:
        """Keep the console quiet."""


class ApiHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], api: GuestApi) -> None:
        self.api = api
        super().__init__(address, _ApiHandler)


class VsockApiHTTPServer(ApiHTTPServer):
    address_family = socket.AF_VSOCK if hasattr(socket, "AF_VSOCK") else socket.AF_UNSPEC
    allow_reuse_address = False

    def __init__(self, port: int, api: GuestApi) -> None:
        # (VMADDR_CID_ANY, port); the tuple type is TCP's, the values are vsock's.
        super().__init__((0xFFFFFFFF, port), api)  # type: ignore[arg-type]

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the bound host name, which a vsock CID is not.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = "vsock", int(self.server_address[1])


def serve(server: ApiHTTPServer, name: str) -> ApiHTTPServer:
    threading.Thread(target=server.serve_forever, name=name, daemon=True).start()
    return server


def start_tcp(api: GuestApi, host: str, port: int) -> ApiHTTPServer:
    return serve(ApiHTTPServer((host, port), api), "guest-api-tcp")


def start_vsock(api: GuestApi, port: int = VSOCK_PORT) -> ApiHTTPServer:
    return serve(VsockApiHTTPServer(port, api), "guest-api-vsock")


def parse_hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


class FrameServer:
    """Answers REQUEST frames read from the agent port with RESPONSE frames of the same id.

    Each request runs in its own thread so a slow one (Docker) does not hold up the rest;
    answers are written whole under the channel's lock, so they never interleave.
    """

    def __init__(self, channel: PortChannel, api: GuestApi, log: Log) -> None:
        self.channel = channel
        self.api = api
        self._log = log
        self._thread: threading.Thread | None = None

    @property
    def path(self) -> Path:
        return self.channel.path

    def start(self) -> "FrameServer":
        self._thread = threading.Thread(target=self._run, name="guest-api-serial", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        for frame in frames_of(self.channel, REQUEST):
            threading.Thread(target=self._answer, args=(frame,), daemon=True).start()

    def _answer(self, frame: Frame) -> None:
        try:
            path, _ctype, body = decode_request(frame.payload)
        except FrameError as exc:
            reply = error(f"bad request envelope: {exc}")
        else:
            reply = self.api.handle(path, body)
        try:
            data = encode_frame(RESPONSE, frame.id, encode_response(reply.status, JSON, reply.body))
        except FrameError as exc:
            reply = error(f"answer not sendable: {exc}")
            data = encode_frame(RESPONSE, frame.id, encode_response(reply.status, JSON, reply.body))
        if not self.channel.send(data, SEND_TIMEOUT):
            self._log(f"answer {frame.id} on {self.channel.path} not delivered (host gone)")
        if reply.after is not None:
            reply.after()
