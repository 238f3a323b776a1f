"""The agent's end of a virtio-serial port, or of a Unix socket standing in for one in tests.

A port is found by the name QEMU gave it (``virtserialport,name=...``): the image has no udev,
so there is no /dev/virtio-ports/<name> link, and /sys/class/virtio-ports/vportNpM/name is
matched instead; the node is /dev/vportNpM.

A path given on the command line follows one rule: a Unix socket is connected to (the test
listens on it, as QEMU's ``server=on`` chardev does on the host); anything else (a character
device, a FIFO) is opened read-write.

Both kinds lose their peer: a virtio-serial port reads EOF while nobody is connected to the
host side of it, a socket reads EOF when the test hangs up. ``recv`` then backs off briefly and
reports the break as ``b""``, so a reader drops whatever partial frame it held; it never gives up.
"""

import contextlib
import os
import select
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from guest_agent.framing import Frame, FrameDecoder

VIRTIO_PORTS = Path("/sys/class/virtio-ports")
DEV = Path("/dev")
READ_SIZE = 65536
#: Pause after EOF or a failed open. On a port whose host side is disconnected, poll() reports
#: POLLHUP at once, so without a pause the reader would spin; 0.2 s bounds how late a host that
#: reconnects is noticed.
BACKOFF = 0.2
MAX_BACKOFF = 1.0

Log = Callable[[str], None]


def find_port(name: str, sys_dir: Path = VIRTIO_PORTS, dev_dir: Path = DEV) -> Path | None:
    """The device node of the virtio-serial port called ``name``, or None if there is none."""
    try:
        entries = sorted(sys_dir.iterdir())
    except OSError:
        return None
    for entry in entries:
        try:
            if (entry / "name").read_text().strip() == name:
                return dev_dir / entry.name
        except OSError:
            continue
    return None


class PortChannel:
    """A byte stream to the host that survives the host going away and coming back.

    One reader thread calls ``recv``; any thread may call ``send``. Only the reader opens and
    closes the underlying descriptor (under the write lock, so a writer never writes to a
    descriptor number that was closed and reused).
    """

    def __init__(self, path: Path, log: Log | None = None) -> None:
        self.path = path
        self._log = log or (lambda _message: None)
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._sock: socket.socket | None = None
        self._backoff = BACKOFF
        self._reported_open_error = False
        self._peer_up = False

    @property
    def is_socket(self) -> bool:
        return self._sock is not None

    def recv(self, timeout: float) -> bytes | None:
        """Bytes from the host; None when nothing came within ``timeout``; ``b""`` on a break.

        A break is a (re)connect, an EOF or a read error: bytes buffered by the caller belong to
        a stream that is gone.
        """
        fd = self._fd
        if fd is None:
            if self._open():
                return b""
            self._pause(grow=True)
            return b""
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        if not poller.poll(max(timeout, 0.0) * 1000):
            return None
        try:
            data = os.read(fd, READ_SIZE)
        except BlockingIOError:
            return None
        except OSError as exc:
            self._log(f"{self.path}: read failed: {exc}; reopening")
            self._close()
            self._pause(grow=True)
            return b""
        if data:
            self._backoff = BACKOFF
            if not self._peer_up:
                self._peer_up = True
            return data
        if self._peer_up:
            self._peer_up = False
            self._log(f"{self.path}: host side disconnected; waiting for it")
        if self._sock is not None:
            # A socket's EOF is final; a virtio-serial port reads data again once the host
            # reconnects, so its descriptor stays open.
            self._close()
        self._pause(grow=False)
        return b""

    def send(self, data: bytes, timeout: float) -> bool:
        """Write all of ``data`` within ``timeout``; False if the host is absent or stalled."""
        deadline = time.monotonic() + timeout
        with self._lock:
            fd = self._fd
            if fd is None:
                return False
            view = memoryview(data)
            while view:
                try:
                    view = view[os.write(fd, view) :]
                    continue
                except BlockingIOError:
                    pass
                except OSError:
                    return False
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                poller = select.poll()
                poller.register(fd, select.POLLOUT)
                events = poller.poll(remaining * 1000)
                if events and not events[0][1] & select.POLLOUT:
                    # A virtio-serial port whose host is disconnected reports POLLHUP instead
                    # of POLLOUT: wait for the host without spinning.
                    time.sleep(min(0.05, max(remaining, 0.0)))
        return True

    def close(self) -> None:
        self._close()

    def _open(self) -> bool:
        try:
            mode = self.path.stat().st_mode
        except OSError as exc:
            self._report_open_error(exc)
            return False
        sock: socket.socket | None = None
        try:
            if stat.S_ISSOCK(mode):
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.connect(str(self.path))
                sock.setblocking(False)
                fd = sock.fileno()
            else:
                fd = os.open(self.path, os.O_RDWR | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
        except OSError as exc:
            if sock is not None:
                sock.close()
            self._report_open_error(exc)
            return False
        with self._lock:
            self._fd, self._sock = fd, sock
        self._reported_open_error = False
        self._backoff = BACKOFF
        self._peer_up = sock is not None
        return True

    def _close(self) -> None:
        with self._lock:
            fd, sock = self._fd, self._sock
            self._fd = self._sock = None
        with contextlib.suppress(OSError):
            if sock is not None:
                sock.close()
            elif fd is not None:
                os.close(fd)

    def _pause(self, grow: bool) -> None:
        time.sleep(self._backoff)
        if grow:
            self._backoff = min(self._backoff * 2, MAX_BACKOFF)

    def _report_open_error(self, exc: OSError) -> None:
        if not self._reported_open_error:
            self._reported_open_error = True
            self._log(f"{self.path}: cannot open ({exc}); retrying")


def frames_of(channel: PortChannel, kind: int) -> Iterator[Frame]:
    """Frames of one kind read from ``channel``, forever.

    A break or an idle second starts a fresh decoder: a half-received frame will never be
    completed, and keeping it would swallow the next one.
    """
    decoder = FrameDecoder()
    while True:
        data = channel.recv(1.0)
        if not data:
            decoder = FrameDecoder()
            continue
        for frame in decoder.feed(data):
            if frame.kind == kind:
                yield frame
