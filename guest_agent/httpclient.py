"""One HTTP/1.1 exchange over any stream socket (vsock to the host API, Unix to Docker)."""

import http.client
import socket
from collections.abc import Callable

Connect = Callable[[float], socket.socket]
MAX_BODY = 16 * 1024 * 1024


class _Connection(http.client.HTTPConnection):
    def __init__(self, connect: Connect, host: str, timeout: float) -> None:
        super().__init__(host, timeout=timeout)
        self._connect_socket = connect
        self._timeout = timeout

    def connect(self) -> None:
        self.sock = self._connect_socket(self._timeout)


def request(
    connect: Connect,
    method: str,
    path: str,
    *,
    body: bytes = b"",
    content_type: str = "application/json",
    timeout: float = 5.0,
    host: str = "localhost",
) -> tuple[int, str, bytes]:
    """Send one request and return (status, content type, body); OSError on any failure."""
    conn = _Connection(connect, host, timeout)
    try:
        headers = {"Connection": "close"}
        if body or method == "POST":
            headers["Content-Type"] = content_type
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        data = response.read(MAX_BODY + 1)
        if len(data) > MAX_BODY:
            raise OSError(f"response to {path} is larger than {MAX_BODY} bytes")
        return response.status, response.getheader("Content-Type", ""), data
    except http.client.HTTPException as exc:
        raise OSError(f"bad HTTP response to {path}: {exc!r}") from None
    finally:
        conn.close()


def unix_connector(path: str) -> Connect:
    def connect(timeout: float) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except BaseException:
            sock.close()
            raise
        return sock

    return connect


def vsock_connector(cid: int, port: int) -> Connect:
    def connect(timeout: float) -> socket.socket:
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect((cid, port))
        except BaseException:
            sock.close()
            raise
        return sock

    return connect
