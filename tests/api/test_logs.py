"""GET /logs: tailing, rendering, following (rotation, truncation, heartbeats) and validation."""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from starlette.applications import Starlette

from tests.conftest import populate_images
from tests.support.daemon_proc import start_daemon
from tests.support.log_server import serve_in_thread
from tests.support.short_dirs import short_dir
from tests.support.vm_ops import FAKE_IMAGE, create, rpc, status_of
from vmm.api.logs import (
    CHANNELS,
    HEARTBEAT,
    MAX_PIECE,
    logs_route,
    snapshot,
    stream_log,
    strip_ansi,
    tail_lines,
    tail_offset,
)

T = TypeVar("T")

POLL = 0.01
IDLE = 0.2  # heartbeat period for generator-level tests
SERVER_IDLE = 0.3  # heartbeat period of the test server
TIMEOUT = 15.0


# --- helpers ---------------------------------------------------------------------------------


def run(coro: Coroutine[Any, Any, T]) -> T:
    async def bounded() -> T:
        async with asyncio.timeout(30):
            return await coro

    return asyncio.run(bounded())


def follow(path: Path, *, lines: int = 10, ansi: bool = False) -> AsyncGenerator[bytes, None]:
    return stream_log(
        path, lines=lines, follow=True, ansi=ansi, heartbeat_after=IDLE, poll_interval=POLL
    )


async def take(
    gen: AsyncGenerator[bytes, None], count: int, *, heartbeats: bool = False
) -> list[bytes]:
    """The next ``count`` chunks (heartbeats skipped unless asked for)."""
    out: list[bytes] = []
    async with asyncio.timeout(TIMEOUT):
        while len(out) < count:
            chunk = await anext(gen)
            if chunk == HEARTBEAT and not heartbeats:
                continue
            out.append(chunk)
    return out


async def collect(path: Path, **kwargs: Any) -> list[bytes]:
    return [chunk async for chunk in stream_log(path, follow=False, **kwargs)]


async def collect_any(path: Path, *, follow: bool) -> list[bytes]:
    gen = stream_log(path, lines=10, follow=follow, ansi=False, heartbeat_after=IDLE,
                     poll_interval=POLL)
    return [chunk async for chunk in gen]


def append(path: Path, data: bytes) -> None:
    with path.open("ab") as f:
        f.write(data)


def open_fds(path: Path) -> int:
    """How many descriptors of this process refer to ``path``."""
    target = path.resolve()
    count = 0
    for entry in Path("/proc/self/fd").iterdir():
        try:
            if entry.readlink() == target:
                count += 1
        except OSError:
            pass  # closed while we looked
    return count


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


class BodyReader:
    """Reads a streamed response body incrementally, across several waits."""

    def __init__(self, response: httpx.Response) -> None:
        self._chunks = response.iter_raw()
        self.received = b""

    def until(self, needle: bytes, timeout: float = TIMEOUT) -> bytes:
        """Read until ``needle`` shows up after what was consumed (heartbeats keep it moving)."""
        deadline = time.monotonic() + timeout
        while needle not in self.received:
            if time.monotonic() > deadline:
                raise AssertionError(f"{needle!r} not received; got ...{self.received[-300:]!r}")
            try:
                self.received += next(self._chunks)
            except StopIteration:
                raise AssertionError(f"stream ended before {needle!r}") from None
        consumed, _, self.received = self.received.partition(needle)
        return consumed + needle

    def rest(self) -> bytes:
        """Everything until the server ends the body (the client's read timeout bounds it)."""
        rest = self.received + b"".join(self._chunks)
        self.received = b""
        return rest


def numbered(count: int) -> bytes:
    return b"".join(b"line %d\n" % i for i in range(count))


# --- tail_lines / tail_offset ----------------------------------------------------------------


def test_tail_lines_returns_last_n(tmp_path: Path) -> None:
    """tail_lines gives exactly the last N lines, newlines kept."""
    path = tmp_path / "log"
    path.write_bytes(numbered(100))
    assert tail_lines(path, 3) == [b"line 97\n", b"line 98\n", b"line 99\n"]
    assert tail_lines(path, 1000) == numbered(100).splitlines(keepends=True)
    assert tail_lines(path, 0) == []


def test_tail_lines_without_trailing_newline(tmp_path: Path) -> None:
    """A last line with no newline yet counts as a line and is returned as is."""
    path = tmp_path / "log"
    path.write_bytes(b"a\nb\nc")
    assert tail_lines(path, 2) == [b"b\n", b"c"]
    path.write_bytes(b"only")
    assert tail_lines(path, 5) == [b"only"]


def test_tail_lines_empty_and_missing(tmp_path: Path) -> None:
    """An empty file and a missing file both have no lines."""
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert tail_lines(empty, 10) == []
    assert tail_lines(tmp_path / "missing", 10) == []


@pytest.mark.parametrize("block_size", [1, 2, 3, 5, 8, 64, 4096])
@pytest.mark.parametrize(
    "content",
    [b"", b"\n", b"\n\n\n", b"a", b"a\n", b"a\nbb\n\nccc", b"x\r\ny\r\n", b"one\n\ntwo\n\n"],
)
def test_tail_lines_matches_splitlines_for_any_block_size(
    tmp_path: Path, content: bytes, block_size: int
) -> None:
    """Reading backwards in blocks agrees with the obvious answer at every block size."""
    path = tmp_path / "log"
    path.write_bytes(content)
    every = content.splitlines(keepends=True)
    for count in range(6):
        expected = every[max(0, len(every) - count) :] if count else []
        assert tail_lines(path, count, block_size=block_size) == expected


def test_tail_offset_reads_only_the_tail(tmp_path: Path) -> None:
    """tail_offset reads blocks from the end: a few lines of a 4 MB file cost a few blocks."""
    path = tmp_path / "log"
    content = numbered(400_000)
    path.write_bytes(content)
    reads: list[tuple[int, int]] = []

    with path.open("rb") as f:

        def read_at(length: int, offset: int) -> bytes:
            reads.append((length, offset))
            f.seek(offset)
            return f.read(length)

        start = tail_offset(read_at, len(content), 3, block_size=16)
    assert content[start:] == b"line 399997\nline 399998\nline 399999\n"
    assert sum(length for length, _ in reads) <= 64
    assert min(offset for _, offset in reads) >= len(content) - 64


def test_tail_lines_of_a_huge_sparse_file(tmp_path: Path) -> None:
    """The tail of a 1 GiB file comes back (fast) without reading the gigabyte before it."""
    path = tmp_path / "huge"
    with path.open("wb") as f:
        f.truncate(1 << 30)  # sparse: costs no disk, but reading it all would take seconds
        f.seek(1 << 30)
        f.write(b"tail 1\ntail 2\ntail 3\n")
    assert tail_lines(path, 2) == [b"tail 2\n", b"tail 3\n"]


# --- rendering -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        (b"\x1b[31mred\x1b[0m plain \x1b[1;32;40mbold\x1b[m\n", b"red plain bold\n"),
        (b"\x1b[2J\x1b[H\x1b[10;20Hx\x1b[?25l\x1b[K\x1b[3A\n", b"x\n"),
        (b"\x1b]0;my title\x07after", b"after"),
        (b"\x1b]2;title\x1b\\after", b"after"),
        (b"\x1b]8;;http://example.com\x1b\\link\x1b]8;;\x1b\\", b"link"),
        (b"\x1b(Bx\x1b7y\x1b8\x1b=z\x1bc", b"xyz"),
        (b"\x1bP1$r0m\x1b\\done", b"done"),
        (b"abc\x1b", b"abc"),
        (b"a\x1b\nb", b"a\nb"),
        (b"\x1b]0;unterminated title\nnext line\n", b"\nnext line\n"),
        ("héllo [1m] ~ plain".encode(), "héllo [1m] ~ plain".encode()),
    ],
)
def test_strip_ansi(raw: bytes, clean: bytes) -> None:
    """Colours, cursor moves, OSC titles/links, charset and lone ESC bytes are removed."""
    assert strip_ansi(raw) == clean


def test_stream_strips_ansi_unless_asked_to_keep_it(tmp_path: Path) -> None:
    """Escapes are stripped by default and passed through untouched with ansi=True."""
    path = tmp_path / "log"
    raw = b"\x1b]0;title\x07\x1b[1;31mERROR\x1b[0m boot\x1b[K\n"
    path.write_bytes(raw)
    assert run(collect(path, lines=10, ansi=False)) == [b"ERROR boot\n"]
    assert run(collect(path, lines=10, ansi=True)) == [raw]


def test_long_lines_are_split_into_8k_pieces(tmp_path: Path) -> None:
    """A line over 8 KiB arrives as 8 KiB pieces; one of exactly 8 KiB stays whole."""
    path = tmp_path / "log"
    path.write_bytes(b"a" * 20_000 + b"\n" + b"b" * MAX_PIECE + b"\n")
    chunks = run(collect(path, lines=10, ansi=False))
    assert [len(c) for c in chunks] == [MAX_PIECE, MAX_PIECE, 20_000 - 2 * MAX_PIECE + 1,
                                        MAX_PIECE + 1]
    assert b"".join(chunks) == path.read_bytes()


def test_split_never_cuts_a_utf8_character(tmp_path: Path) -> None:
    """A multi-byte character straddling the 8 KiB mark goes whole into the next piece."""
    path = tmp_path / "log"
    path.write_bytes(b"a" * (MAX_PIECE - 1) + "é€".encode() + b"\n")
    chunks = run(collect(path, lines=10, ansi=False))
    assert chunks == [b"a" * (MAX_PIECE - 1), "é€\n".encode()]
    for chunk in chunks:
        chunk.decode("utf-8")  # strict: no replacement characters were needed


def test_invalid_utf8_is_replaced(tmp_path: Path) -> None:
    """Bytes that are not UTF-8 become U+FFFD; valid text around them is kept."""
    path = tmp_path / "log"
    path.write_bytes(b"ok \xff\xfe end \xe2\x82\n")
    assert run(collect(path, lines=10, ansi=False)) == ["ok \ufffd\ufffd end \ufffd\n".encode()]


def test_partial_last_line_is_sent_when_not_following(tmp_path: Path) -> None:
    """Without follow, a last line with no newline is sent as is at the end."""
    path = tmp_path / "log"
    path.write_bytes(b"abc\ndef")
    assert run(collect(path, lines=10, ansi=False)) == [b"abc\n", b"def"]
    assert run(collect(tmp_path / "missing", lines=10, ansi=False)) == []


@pytest.mark.parametrize("kind", ["directory", "fifo"])
def test_unreadable_log_is_reported_in_band(tmp_path: Path, kind: str) -> None:
    """A log that is a directory or a FIFO ends the stream with an error line, never a hang."""
    path = tmp_path / "serial.log"
    if kind == "directory":
        path.mkdir()
    else:
        os.mkfifo(path)
    for following in (False, True):
        chunks = run(collect_any(path, follow=following))
        assert len(chunks) == 1
        assert chunks[0].startswith(b"[vmm error] cannot read serial.log: ")
    assert open_fds(path) == 0


# --- following -------------------------------------------------------------------------------


def test_follow_sends_appended_lines_and_holds_partial_ones(tmp_path: Path) -> None:
    """Appended lines arrive; a partial line waits for its newline (heartbeat comes first)."""
    path = tmp_path / "log"
    path.write_bytes(b"one\ntwo\n")

    async def scenario() -> None:
        gen = follow(path)
        try:
            assert await take(gen, 2) == [b"one\n", b"two\n"]
            append(path, b"three\nfour")
            assert await take(gen, 1) == [b"three\n"]
            assert await take(gen, 1, heartbeats=True) == [HEARTBEAT]  # "four" held back
            append(path, b" more\n")
            assert await take(gen, 1) == [b"four more\n"]
        finally:
            await gen.aclose()

    run(scenario())


def test_follow_starts_where_the_request_found_the_log(tmp_path: Path) -> None:
    """Lines appended between accepting the request and the first read are not skipped."""
    log_path = tmp_path / "serial.log"
    log_path.write_bytes(b"old\n")
    taken = snapshot(log_path)  # the route takes this before the response starts
    append(log_path, b"written right after the request\n")
    fresh = snapshot(tmp_path / "later.log")
    (tmp_path / "later.log").write_bytes(b"first line of a new file\n")

    async def scenario() -> None:
        gen = stream_log(log_path, lines=0, follow=True, ansi=False, heartbeat_after=IDLE,
                         poll_interval=POLL, start=taken)
        later = stream_log(tmp_path / "later.log", lines=0, follow=True, ansi=False,
                           heartbeat_after=IDLE, poll_interval=POLL, start=fresh)
        try:
            assert await take(gen, 1) == [b"written right after the request\n"]
            assert await take(later, 1) == [b"first line of a new file\n"]
        finally:
            await gen.aclose()
            await later.aclose()

    run(scenario())


def test_follow_flushes_a_partial_line_over_8k(tmp_path: Path) -> None:
    """A growing line with no newline is sent in 8 KiB pieces instead of held forever."""
    path = tmp_path / "log"
    path.write_bytes(b"")

    async def scenario() -> None:
        gen = follow(path)
        try:
            append(path, b"z" * (MAX_PIECE + 100))
            assert await take(gen, 1) == [b"z" * MAX_PIECE]
        finally:
            await gen.aclose()

    run(scenario())


def test_follow_restarts_after_truncation_in_place(tmp_path: Path) -> None:
    """A log truncated in place (copy-truncate rotation) is read again from its start."""
    path = tmp_path / "log"
    path.write_bytes(b"aaaa\nbbbb\ncccc\n")

    async def scenario() -> None:
        gen = follow(path)
        try:
            assert len(await take(gen, 3)) == 3
            inode = path.stat().st_ino
            path.write_bytes(b"new\n")  # O_TRUNC: same inode, smaller size
            assert path.stat().st_ino == inode
            assert await take(gen, 1) == [b"new\n"]
        finally:
            await gen.aclose()

    run(scenario())


def test_follow_switches_files_on_rename_and_recreate(tmp_path: Path) -> None:
    """After serial.log -> serial.log.1 and a new serial.log, the old tail then the new file come."""
    path = tmp_path / "serial.log"
    path.write_bytes(b"old 1\n")

    async def scenario() -> None:
        gen = follow(path)
        try:
            assert await take(gen, 1) == [b"old 1\n"]
            append(path, b"old 2\nold 3\n")
            path.rename(tmp_path / "serial.log.1")
            path.write_bytes(b"new 1\n")
            assert await take(gen, 3) == [b"old 2\n", b"old 3\n", b"new 1\n"]
            append(path, b"new 2\n")
            assert await take(gen, 1) == [b"new 2\n"]
        finally:
            await gen.aclose()
        assert open_fds(path) == 0
        assert open_fds(tmp_path / "serial.log.1") == 0

    run(scenario())


def test_follow_waits_for_a_file_that_appears_later(tmp_path: Path) -> None:
    """Following a log that does not exist yet picks it up, from its first byte, once created."""
    path = tmp_path / "serial.log"

    async def scenario() -> None:
        gen = follow(path, lines=0)
        try:
            # The heartbeat proves the stream is live and has looked for the file already.
            assert await take(gen, 1, heartbeats=True) == [HEARTBEAT]
            path.write_bytes(b"booting\nstarted\n")
            assert await take(gen, 2) == [b"booting\n", b"started\n"]
        finally:
            await gen.aclose()

    run(scenario())


def test_follow_sends_heartbeats_while_idle(tmp_path: Path) -> None:
    """With nothing to send, a heartbeat goes out after each idle period."""
    path = tmp_path / "log"
    path.write_bytes(b"x\n")

    async def scenario() -> None:
        gen = follow(path)
        try:
            assert await take(gen, 3, heartbeats=True) == [b"x\n", HEARTBEAT, HEARTBEAT]
        finally:
            await gen.aclose()

    run(scenario())


def test_follow_ends_once_gone_after_sending_what_was_written(tmp_path: Path) -> None:
    """When gone() turns true, a follow sends the rest (partial line too), then ends."""
    path = tmp_path / "log"
    path.write_bytes(b"a\n")
    removed = False

    async def scenario() -> None:
        nonlocal removed
        gen = stream_log(path, lines=10, follow=True, ansi=False, heartbeat_after=IDLE,
                         poll_interval=POLL, gone=lambda: removed)
        try:
            assert await take(gen, 1) == [b"a\n"]
            append(path, b"b\npartial")
            removed = True
            async with asyncio.timeout(TIMEOUT):
                rest = [chunk async for chunk in gen if chunk != HEARTBEAT]
            assert rest == [b"b\n", b"partial"]
        finally:
            await gen.aclose()
        assert open_fds(path) == 0

    run(scenario())


def test_follow_of_a_log_never_created_ends_once_gone(tmp_path: Path) -> None:
    """A follow waiting for a log that never appeared ends when gone() turns true."""
    removed = False

    async def scenario() -> list[bytes]:
        nonlocal removed
        gen = stream_log(tmp_path / "never", lines=10, follow=True, ansi=False,
                         heartbeat_after=IDLE, poll_interval=POLL, gone=lambda: removed)
        assert await take(gen, 1, heartbeats=True) == [HEARTBEAT]
        removed = True
        async with asyncio.timeout(TIMEOUT):
            return [chunk async for chunk in gen if chunk != HEARTBEAT]

    assert run(scenario()) == []


def test_cancelled_follow_closes_its_file_and_leaves_no_task(tmp_path: Path) -> None:
    """Cancelling the consumer of an idle follow (a disconnect) runs cleanup: fd closed, no task."""
    path = tmp_path / "log"
    path.write_bytes(b"x\n")

    async def scenario() -> None:
        first = asyncio.Event()

        async def consume() -> None:
            async for _ in follow(path):
                first.set()

        task = asyncio.create_task(consume())
        async with asyncio.timeout(TIMEOUT):
            await first.wait()
        assert open_fds(path) == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert open_fds(path) == 0
        assert asyncio.all_tasks() == {asyncio.current_task()}

    run(scenario())


def test_closed_generator_closes_its_file(tmp_path: Path) -> None:
    """aclose() on a follow parked at a yield closes the file at once."""
    path = tmp_path / "log"
    path.write_bytes(b"a\nb\n")

    async def scenario() -> None:
        gen = follow(path)
        assert await take(gen, 1) == [b"a\n"]
        assert open_fds(path) == 1
        await gen.aclose()
        assert open_fds(path) == 0

    run(scenario())


# --- HTTP ------------------------------------------------------------------------------------


@dataclass
class LogService:
    url: str
    run_dir: Path
    vms: dict[str, Path] = field(default_factory=dict)

    def add_vm(self) -> tuple[str, Path]:
        vm_id = str(uuid.uuid4())
        workdir = self.run_dir / vm_id
        workdir.mkdir()
        self.vms[vm_id] = workdir
        return vm_id, workdir

    def get(self, params: dict[str, str]) -> httpx.Response:
        return httpx.get(self.url, params=params, timeout=TIMEOUT)


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LogService]:
    root = tmp_path_factory.mktemp("logs")
    run_dir = root / "host" / "run"
    run_dir.mkdir(parents=True)
    # Something an id like ../../etc would reach if it were ever joined onto the run dir.
    (root / "etc").mkdir()
    (root / "etc" / "serial.log").write_bytes(b"SECRET\n")
    vms: dict[str, Path] = {}

    def lookup(vm_id: str) -> Path | None:
        return vms.get(vm_id)

    app = Starlette(
        routes=[logs_route(lookup, heartbeat_after=SERVER_IDLE, poll_interval=0.02)]
    )
    with serve_in_thread(app) as base:
        yield LogService(url=f"{base}/logs", run_dir=run_dir, vms=vms)


def test_http_tail_defaults(service: LogService) -> None:
    """Without lines, the last 10000 lines of serial.log come back as UTF-8 text/plain."""
    vm_id, workdir = service.add_vm()
    (workdir / "serial.log").write_bytes(numbered(10_005))
    response = service.get({"id": vm_id})
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/plain; charset=utf-8"
    assert response.content == numbered(10_005).split(b"\n", 5)[5]


def test_http_tail_of_n_lines_and_channels(service: LogService) -> None:
    """lines=N gives the last N lines; ch picks serial.log, stdout.log or stderr.log."""
    vm_id, workdir = service.add_vm()
    for ch, name in CHANNELS.items():
        (workdir / name).write_bytes(b"".join(b"%s %d\n" % (ch.encode(), i) for i in range(5)))
    assert service.get({"id": vm_id, "lines": "2"}).content == b"serial 3\nserial 4\n"
    assert service.get({"id": vm_id, "lines": "1", "ch": "stdout"}).content == b"stdout 4\n"
    assert service.get({"id": vm_id, "lines": "1", "ch": "stderr"}).content == b"stderr 4\n"
    assert service.get({"id": vm_id, "lines": "0"}).content == b""
    huge = service.get({"id": vm_id, "lines": "9" * 40})  # capped, not an error
    assert huge.status_code == 200
    assert huge.content.count(b"\n") == 5


def test_http_missing_log_is_empty(service: LogService) -> None:
    """A known VM whose log does not exist yet answers 200 with an empty body."""
    vm_id, _ = service.add_vm()
    response = service.get({"id": vm_id})
    assert response.status_code == 200
    assert response.content == b""


def test_http_tail_of_a_50mb_file(service: LogService) -> None:
    """The last lines of a 50 MB log come back correctly (and well within the timeout)."""
    vm_id, workdir = service.add_vm()
    line = b"%-99s\n"
    (workdir / "serial.log").write_bytes(b"".join(line % (b"%d" % i) for i in range(500_000)))
    response = service.get({"id": vm_id, "lines": "2"})
    assert response.content == line % b"499998" + line % b"499999"


def test_http_ansi_stripped_by_default_and_kept_on_request(service: LogService) -> None:
    """ansi absent strips escapes; ansi=true (in any accepted spelling) keeps them."""
    vm_id, workdir = service.add_vm()
    raw = b"\x1b[32mOK\x1b[0m \x1b]0;t\x07done\n"
    (workdir / "serial.log").write_bytes(raw)
    assert service.get({"id": vm_id}).content == b"OK done\n"
    for spelling in ("true", "1", "YES", "On"):
        assert service.get({"id": vm_id, "ansi": spelling}).content == raw
    for spelling in ("false", "0", "No", "OFF"):
        assert service.get({"id": vm_id, "ansi": spelling}).content == b"OK done\n"


def test_http_follow_streams_appends_and_heartbeats(service: LogService) -> None:
    """follow=true streams the tail, then appended lines, then heartbeats while idle."""
    vm_id, workdir = service.add_vm()
    log = workdir / "serial.log"
    log.write_bytes(b"first\n")
    with httpx.Client(timeout=TIMEOUT) as client, client.stream(
        "GET", service.url, params={"id": vm_id, "follow": "true", "lines": "5"}
    ) as response:
        assert response.status_code == 200
        body = BodyReader(response)
        assert body.until(b"first\n") == b"first\n"
        append(log, b"second\n")
        assert body.until(b"second\n").replace(HEARTBEAT, b"") == b"second\n"
        body.until(HEARTBEAT)


def test_http_follow_false_ends_after_the_tail(service: LogService) -> None:
    """follow=false (and its spellings) ends the response once the tail is sent."""
    vm_id, workdir = service.add_vm()
    (workdir / "serial.log").write_bytes(b"a\nb\n")
    for spelling in ("false", "0", "no", "off", "FALSE"):
        assert service.get({"id": vm_id, "follow": spelling}).content == b"a\nb\n"


def test_http_client_disconnect_ends_the_stream(
    service: LogService, caplog: pytest.LogCaptureFixture
) -> None:
    """Closing a followed stream closes the server's file and logs no error."""
    caplog.set_level(logging.WARNING)
    vm_id, workdir = service.add_vm()
    log = workdir / "serial.log"
    log.write_bytes(b"hello\n")
    with httpx.Client(timeout=TIMEOUT) as client, client.stream(
        "GET", service.url, params={"id": vm_id, "follow": "1"}
    ) as response:
        body = BodyReader(response)  # kept: dropping it would close the response early
        body.until(b"hello\n")
        assert open_fds(log) == 1
    wait_until(lambda: open_fds(log) == 0, "the server to close serial.log")
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []


def test_http_disconnect_while_the_server_is_blocked_writing(service: LogService) -> None:
    """A client that stops reading a flood and hangs up still gets the server's file closed."""
    vm_id, workdir = service.add_vm()
    log = workdir / "serial.log"
    log.write_bytes(b"".join(b"%-79d\n" % i for i in range(100_000)))  # 8 MB: fills buffers
    with httpx.Client(timeout=TIMEOUT) as client, client.stream(
        "GET", service.url, params={"id": vm_id, "follow": "true", "lines": "1000000"}
    ) as response:
        body = BodyReader(response)
        body.until(b"\n")
        wait_until(lambda: open_fds(log) == 1, "the server to open serial.log")
    wait_until(lambda: open_fds(log) == 0, "the server to close serial.log")


def test_http_head_does_not_start_a_stream(service: LogService) -> None:
    """HEAD with follow answers the headers at once and opens no file."""
    vm_id, workdir = service.add_vm()
    log = workdir / "serial.log"
    log.write_bytes(b"x\n")
    response = httpx.head(service.url, params={"id": vm_id, "follow": "true"}, timeout=TIMEOUT)
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/plain; charset=utf-8"
    assert open_fds(log) == 0


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({}, "id"),
        ({"id": ""}, "id"),
        ({"follow": "maybe"}, "follow"),
        ({"follow": "2"}, "follow"),
        ({"ansi": "tru"}, "ansi"),
        ({"lines": "-1"}, "lines"),
        ({"lines": "abc"}, "lines"),
        ({"lines": "1.5"}, "lines"),
        ({"lines": ""}, "lines"),
        ({"lines": "+3"}, "lines"),
    ],
)
def test_http_bad_parameters_are_400(
    service: LogService, params: dict[str, str], field: str
) -> None:
    """A missing id or a malformed follow/ansi/lines is a JSON 400 naming the parameter."""
    vm_id, _ = service.add_vm()
    query = params if field == "id" else {"id": vm_id, **params}
    response = service.get(query)
    assert response.status_code == 400
    body = response.json()
    assert body["code"] == "INVALID_ARGUMENT"
    assert f"`{field}`" in body["message"]
    assert body["error"] == body["message"]


def test_http_unknown_channel_is_400(service: LogService) -> None:
    """An unknown ch is a 400 saying `Unknown channel <ch>`."""
    vm_id, _ = service.add_vm()
    response = service.get({"id": vm_id, "ch": "x"})
    assert response.status_code == 400
    assert response.json()["message"] == "Unknown channel x"


@pytest.mark.parametrize("vm_id", ["no-such-vm", "../../etc", "..", "/etc"])
def test_http_unknown_vm_is_404_and_reads_nothing(service: LogService, vm_id: str) -> None:
    """An id the registry does not know, path-like or not, is a 404 and no file is read."""
    response = service.get({"id": vm_id})
    assert response.status_code == 404
    body = response.json()
    assert body["code"] == "VM_NOT_FOUND"
    assert "VM not found" in body["message"]
    assert vm_id in body["message"]
    assert "SECRET" not in response.text


# --- through the daemon ----------------------------------------------------------------------


def test_daemon_follow_ends_when_the_vm_is_removed() -> None:
    """A /logs?follow=true stream on a VM ends (body complete) once RemoveVm has removed it."""
    with short_dir("vmmg") as workdir:
        populate_images(workdir / "state" / "images")
        daemon = start_daemon(workdir, extra_config='[cvm]\naccel = "tcg"\n')
        try:
            with daemon.client() as client:
                vm_id = create(client, FAKE_IMAGE, stopped=True)
                serial = workdir / "state" / "vm" / vm_id / "serial.log"
                serial.write_bytes(b"booted once\n")
                with httpx.Client(base_url=daemon.base_url, timeout=TIMEOUT) as streamer, \
                        streamer.stream("GET", "/logs", params={"id": vm_id, "follow": "true"}) \
                        as response:
                    assert response.status_code == 200
                    body = BodyReader(response)
                    body.until(b"booted once\n")
                    append(serial, b"last words\n")
                    rpc(client, "RemoveVm", {"id": vm_id})
                    # Ends well before the daemon's 60 s heartbeat; a stream that kept
                    # running would hit the client's read timeout here instead.
                    rest = body.rest()
                assert rest == b"last words\n"
                assert status_of(client, vm_id) == "gone"
        finally:
            daemon.destroy()
