"""``GET /logs``: the tail of a VM's serial/stdout/stderr log, optionally followed as it grows.

``GET /logs?id=<vm>&follow=<bool>&ansi=<bool>&lines=<n>&ch=<serial|stdout|stderr>`` answers a
``text/plain`` stream: the last ``lines`` lines of ``<workdir>/<ch>.log``, then, with ``follow``,
whatever is appended. Every chunk is one line (with its newline) of at most ``MAX_PIECE`` bytes,
lossily decoded as UTF-8 and, unless ``ansi``, with terminal escape sequences removed.

Following polls the file instead of using inotify: it works on every filesystem, survives the
file being truncated in place or renamed away and recreated (both are how logs get rotated), and
waits for a file that does not exist yet. Reads are bounded (``READ_CHUNK``) and run in worker
threads, so a huge or slow file never stalls the event loop, and memory stays bounded whatever
the file size.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import re
import stat
import threading
from collections.abc import AsyncGenerator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from vmm.core.exceptions import BadRequest, InvalidField, VmmError, VmNotFound
from vmm.prpc.bridge import error_payload

log = logging.getLogger(__name__)

CHANNELS = {"serial": "serial.log", "stdout": "stdout.log", "stderr": "stderr.log"}
HEARTBEAT = b"[vmm heartbeat]\n"
MEDIA_TYPE = "text/plain; charset=utf-8"

DEFAULT_LINES = 10_000
MAX_LINES = 1_000_000
MAX_PIECE = 8 * 1024
READ_CHUNK = 64 * 1024
TAIL_BLOCK = 64 * 1024

_TRUE = frozenset({"", "1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})
_DIGITS = re.compile(r"[0-9]+")

# Order matters: string-type sequences (OSC, DCS, SOS, PM, APC) run to BEL or ST and must be
# tried before the generic two-byte escape would eat just their introducer. An unterminated one
# ends at the newline so a garbled title cannot swallow the following lines.
_ANSI = re.compile(
    rb"""
    \x1b[\]PX^_][^\x07\x1b\n]*(?:\x07|\x1b\\)?
    | \x1b\[[0-?]*[ -/]*[@-~]
    | \x1b[ -/]*[0-~]
    | \x1b
    """,
    re.VERBOSE,
)


def strip_ansi(data: bytes) -> bytes:
    """Remove CSI, OSC/DCS-style strings, other ESC sequences and lone ESC bytes."""
    return _ANSI.sub(b"", data)


# --- tail ------------------------------------------------------------------------------------


def tail_offset(
    read_at: Callable[[int, int], bytes],
    size: int,
    count: int,
    *,
    block_size: int = TAIL_BLOCK,
    stop: threading.Event | None = None,
) -> int:
    """Offset where the last ``count`` lines of a ``size``-byte file start.

    ``read_at(length, offset)`` reads the file (``os.pread`` shape). Blocks are read from the end
    backwards, so the cost is proportional to the tail, not to the file. ``stop`` lets a caller
    that has gone away end a long scan early.
    """
    if count <= 0 or size <= 0:
        return max(size, 0)
    end = size
    # A trailing newline terminates the last line; it does not start an empty one after it.
    if read_at(1, size - 1) == b"\n":
        end = size - 1
    found = 0
    pos = end
    while pos > 0:
        if stop is not None and stop.is_set():
            break
        start = max(0, pos - block_size)
        block = read_at(pos - start, start)
        index = len(block)
        while (index := block.rfind(b"\n", 0, index)) >= 0:
            found += 1
            if found == count:
                return start + index + 1
        pos = start
    return 0


def tail_lines(path: Path, count: int, *, block_size: int = TAIL_BLOCK) -> list[bytes]:
    """The last ``count`` lines of ``path`` (each with its newline if it has one); [] if missing."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return []
    try:
        size = os.fstat(fd).st_size

        def read_at(length: int, offset: int) -> bytes:
            return os.pread(fd, length, offset)

        start = tail_offset(read_at, size, count, block_size=block_size)
        chunks: list[bytes] = []
        offset = start
        while offset < size:
            chunk = os.pread(fd, min(READ_CHUNK, size - offset), offset)
            if not chunk:
                break
            chunks.append(chunk)
            offset += len(chunk)
        return b"".join(chunks).splitlines(keepends=True)
    finally:
        os.close(fd)


# --- lines -----------------------------------------------------------------------------------


class _LineSplitter:
    """Cut a byte stream into lines of at most ``MAX_PIECE`` bytes (plus the newline)."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        buf = self._buf
        buf += data
        pieces: list[bytes] = []
        pos = 0
        while pos < len(buf):
            newline = buf.find(b"\n", pos, pos + MAX_PIECE + 1)
            if newline >= 0:
                pieces.append(bytes(buf[pos : newline + 1]))
                pos = newline + 1
            elif len(buf) - pos > MAX_PIECE:
                cut = _utf8_cut(buf, pos + MAX_PIECE)
                pieces.append(bytes(buf[pos:cut]))
                pos = cut
            else:
                break
        del buf[:pos]
        return pieces

    def flush(self) -> bytes:
        rest = bytes(self._buf)
        self._buf.clear()
        return rest


def _utf8_cut(buf: bytearray, cut: int) -> int:
    """Move ``cut`` back (at most 3 bytes) so it does not split a UTF-8 character in two."""
    for candidate in range(cut, cut - 4, -1):
        if buf[candidate] & 0xC0 != 0x80:
            return candidate
    return cut  # not valid UTF-8 anyway: any cut is as good as another


def _render(piece: bytes, *, ansi: bool) -> bytes:
    if not ansi:
        piece = strip_ansi(piece)
    return piece.decode("utf-8", "replace").encode("utf-8")


# --- following -------------------------------------------------------------------------------


class _LogFile:
    """The file currently read for one stream, with the offset of the next byte to send."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None
        self.ident: tuple[int, int] | None = None
        self.offset = 0
        self.stop = threading.Event()

    def open(self) -> bool:
        """Open the path; False if it does not exist (yet)."""
        try:
            # O_NONBLOCK: if someone made the log a FIFO, opening it must not hang the loop.
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            return False
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise OSError(errno.EINVAL, "not a regular file")
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        self.ident = (st.st_dev, st.st_ino)
        self.offset = 0
        return True

    def size(self) -> int:
        assert self.fd is not None
        return os.fstat(self.fd).st_size

    def replaced(self) -> bool:
        """True once the path names another file than the one open (rename-and-recreate)."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return False  # renamed away, the new one not created yet: keep the old one
        return (st.st_dev, st.st_ino) != self.ident

    async def seek_tail(self, end: int, count: int) -> None:
        fd = self.fd
        assert fd is not None

        def read_at(length: int, offset: int) -> bytes:
            return os.pread(fd, length, offset)

        self.offset = await asyncio.to_thread(
            tail_offset, read_at, end, count, stop=self.stop
        )

    async def read(self, end: int) -> bytes:
        """At most ``READ_CHUNK`` bytes from the offset, never past ``end``."""
        assert self.fd is not None
        length = min(READ_CHUNK, end - self.offset)
        # pread, not read: a worker thread may still be in here after cancellation closed the
        # fd, and pread neither moves a shared offset nor consumes from a pipe or socket that
        # reuses the number, so that late read is harmless.
        data = await asyncio.to_thread(os.pread, self.fd, length, self.offset)
        self.offset += len(data)
        return data

    def close(self) -> None:
        self.stop.set()
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)


@dataclass(frozen=True)
class Snapshot:
    """Where a log stood when a request was accepted; ``ident`` is None if it did not exist."""

    ident: tuple[int, int] | None
    size: int


def snapshot(path: Path) -> Snapshot:
    try:
        st = path.stat()
    except FileNotFoundError:
        return Snapshot(ident=None, size=0)
    return Snapshot(ident=(st.st_dev, st.st_ino), size=st.st_size)


async def stream_log(
    path: Path,
    *,
    lines: int,
    follow: bool,
    ansi: bool,
    heartbeat_after: float = 60.0,
    poll_interval: float = 0.25,
    start: Snapshot | None = None,
    gone: Callable[[], bool] | None = None,
) -> AsyncGenerator[bytes, None]:
    """Yield the last ``lines`` lines of ``path``, then (``follow``) lines as they are appended.

    Every chunk is one rendered line. While following, a trailing partial line is held back until
    its newline arrives (or it outgrows ``MAX_PIECE``), and ``HEARTBEAT`` is sent after each
    ``heartbeat_after`` seconds with nothing sent, so a vanished client is noticed on the write.
    The file is closed when the generator ends or is cancelled (client disconnect).

    ``start`` is the log as the request found it: the tail ends there, and anything appended
    after it is followed, even if it landed before this generator first ran (the response
    headers go out first, so without it a line written right after the request could be lost).

    ``gone()`` turning true (the VM was removed) ends a followed stream once everything written
    until then, a trailing partial line included, has been sent.
    """
    current = _LogFile(path)
    splitter = _LineSplitter()
    try:
        if current.open():
            end = current.size()
            if start is not None and start.ident is None:
                end = 0  # the file appeared after the request: every byte of it is new
            elif start is not None and start.ident == current.ident and start.size <= end:
                end = start.size
            await current.seek_tail(end, max(lines, 0))
            if not follow:
                while current.offset < end:
                    data = await current.read(end)
                    if not data:
                        break  # truncated under us: what was there is gone
                    for piece in splitter.feed(data):
                        if out := _render(piece, ansi=ansi):
                            yield out
        if not follow:
            if out := _render(splitter.flush(), ansi=ansi):
                yield out
            return

        loop = asyncio.get_running_loop()
        last_sent = loop.time()
        while True:
            # Sampled before reading: once the VM is gone nothing more is written, so a read
            # that then finds nothing new has sent everything.
            ending = gone is not None and gone()
            data = b""
            if current.fd is None and current.open():
                current.offset = 0  # created after we started: every byte of it is new
            if current.fd is not None:
                size = current.size()
                if size < current.offset:
                    # Truncated in place (copy-then-truncate rotation). Growth past our offset
                    # between two polls is indistinguishable from appending, as with tail -F.
                    current.offset = 0
                if size > current.offset:
                    data = await current.read(size)
                elif current.replaced():
                    # The old file is read to its end before switching, so nothing is lost.
                    current.close()
                    current = _LogFile(path)
                    continue
            if data:
                for piece in splitter.feed(data):
                    if out := _render(piece, ansi=ansi):
                        yield out
                        last_sent = loop.time()
                continue
            if ending:
                if out := _render(splitter.flush(), ansi=ansi):
                    yield out
                return
            idle = loop.time() - last_sent
            if idle >= heartbeat_after:
                yield HEARTBEAT
                last_sent = loop.time()
                continue
            await asyncio.sleep(min(poll_interval, heartbeat_after - idle))
    except OSError as exc:
        # The response has started, so the status cannot change: say what happened in-band.
        log.warning("reading %s failed: %s", path, exc)
        reason = exc.strerror or str(exc)
        yield f"[vmm error] cannot read {path.name}: {reason}\n".encode()
    finally:
        current.close()


# --- HTTP ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LogQuery:
    vm_id: str
    channel: str
    lines: int
    follow: bool
    ansi: bool


def _parse_bool(params: Mapping[str, str], name: str) -> bool:
    raw = params.get(name)
    if raw is None:
        return False
    value = raw.strip().lower()
    if value in _TRUE:
        return True  # a bare `?follow` means true, like an HTML checkbox
    if value in _FALSE:
        return False
    raise InvalidField(name, f"expected a boolean (true/false/1/0/yes/no/on/off), got {raw!r}")


def parse_query(params: Mapping[str, str]) -> LogQuery:
    """Validate the query of ``GET /logs``; raises ``BadRequest`` naming the bad parameter."""
    vm_id = params.get("id", "")
    if not vm_id:
        raise InvalidField("id", "is required")
    follow = _parse_bool(params, "follow")
    ansi = _parse_bool(params, "ansi")
    raw_lines = params.get("lines")
    lines = DEFAULT_LINES
    if raw_lines is not None:
        if not _DIGITS.fullmatch(raw_lines):
            raise InvalidField("lines", f"expected a non-negative integer, got {raw_lines!r}")
        # Any length of digits is a valid (huge) count; int() on thousands of digits would raise.
        significant = raw_lines.lstrip("0")
        too_long = len(significant) > len(str(MAX_LINES))
        lines = MAX_LINES if too_long else min(int(significant or "0"), MAX_LINES)
    channel = params.get("ch") or "serial"
    if channel not in CHANNELS:
        raise BadRequest(f"Unknown channel {channel}")
    return LogQuery(vm_id=vm_id, channel=channel, lines=lines, follow=follow, ansi=ansi)


class _LogResponse(StreamingResponse):
    """A streaming response that always closes its generator, however the response ends."""

    def __init__(self, body: AsyncGenerator[bytes, None]) -> None:
        super().__init__(body, media_type=MEDIA_TYPE)
        self._body = body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            # A disconnect that lands while the generator is parked at a `yield` (the server
            # busy in `send`) cancels Starlette's loop but not the generator; without this its
            # file would stay open until garbage collection got round to it.
            await self._body.aclose()


class LogLookup(Protocol):
    def __call__(self, vm_id: str) -> Path | None: ...  # the VM's work directory, or None


def logs_route(
    lookup: LogLookup, *, heartbeat_after: float = 60.0, poll_interval: float = 0.25
) -> Route:
    """The ``GET /logs`` route; ``lookup`` maps a VM id to its work directory.

    A followed stream ends once ``lookup`` no longer gives the directory it started with (the
    VM was removed), instead of sending heartbeats until the client leaves.
    """

    async def logs(request: Request) -> Response:
        try:
            query = parse_query(request.query_params)
            # Only a directory the registry hands back is ever used, so an id such as
            # `../../etc` is just an unknown VM: it never becomes part of a path.
            workdir = lookup(query.vm_id)
            if workdir is None:
                raise VmNotFound(query.vm_id)
        except VmmError as exc:
            return error_payload(exc.message, exc.code, exc.status_code, use_json=True)
        if request.method == "HEAD":
            # A followed body never ends; HEAD must not leave a generator running.
            return Response(media_type=MEDIA_TYPE)
        path = workdir / CHANNELS[query.channel]
        body = stream_log(
            path,
            lines=query.lines,
            follow=query.follow,
            ansi=query.ansi,
            heartbeat_after=heartbeat_after,
            poll_interval=poll_interval,
            start=await asyncio.to_thread(snapshot, path),
            gone=lambda: lookup(query.vm_id) != workdir,
        )
        return _LogResponse(body)

    return Route("/logs", logs, methods=["GET"], name="logs")
