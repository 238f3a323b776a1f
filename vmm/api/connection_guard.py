"""Bounds on slow and numerous HTTP clients, which uvicorn does not have.

uvicorn closes a kept-alive connection that stays idle, but nothing bounds the time a client
takes to send a request: every byte received disarms the keep-alive timer, and a connection
that sends nothing at all never has one. A client that sends half a request head, or a body
that never ends, holds its connection (and a file descriptor) for ever; twenty thousand of them
exhausted the daemon's descriptors. ``GuardedHttpProtocol`` adds:

- a head deadline, from the connection's start (or from the first byte of a later request on a
  kept-alive connection) until the request head is complete; then the client gets a 408;
- a body deadline, from the end of the head until the end of the body; then the connection is
  closed, and the handler already running sees the client leave;
- a bound on a request head's size (``MAX_HEAD``): the parser keeps a head's pieces until it is
  complete, so one endless header would otherwise grow the daemon's memory (and its copying)
  for as long as the head deadline lasts; the client gets a 431;
- one write per response (``vmm.api.write_batch``) instead of one per part;
- a cap per listener: a connection past it makes room by closing the listener's connection
  that has waited longest for a request head (the cheapest to lose and, under a slow-client
  flood, almost surely part of it); when every connection is busy the newcomer gets a 503.

Each kind of event is logged at most once per interval with a count, never once per connection.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Literal

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from vmm.api.middleware import SECURITY_HEADERS
from vmm.api.write_batch import BatchedWrites

log = logging.getLogger(__name__)

LOG_INTERVAL = 10.0

# Bytes a request head may take, counted over the reads after the one it begins in (so a head is
# refused somewhere between this and this plus one read of at most 256 KiB). h11 allowed 16 KiB;
# a browser's head with cookies is a few KiB.
MAX_HEAD = 64 * 1024


class ThrottledLog:
    """Counts one kind of event; logs the first at once, then one line per interval at most.

    Call :meth:`count` on the event loop: the summary of a burst is flushed by a loop timer.
    """

    def __init__(
        self, template: str, interval: float = LOG_INTERVAL, logger: logging.Logger = log
    ) -> None:
        self.template = template  # one %d: how many events the line stands for
        self.interval = interval
        self.logger = logger
        self.pending = 0
        self._last = float("-inf")
        self._timer: asyncio.TimerHandle | None = None

    def count(self) -> None:
        self.pending += 1
        if self._timer is not None:
            return
        loop = asyncio.get_running_loop()
        wait = self._last + self.interval - loop.time()
        if wait <= 0:
            self.flush()
        else:
            self._timer = loop.call_later(wait, self.flush)

    def flush(self) -> None:
        self._timer = None
        if self.pending:
            self.logger.warning(self.template, self.pending)
            self.pending = 0
            self._last = asyncio.get_running_loop().time()


def plain_response(status: int, message: str) -> bytes:
    """A whole HTTP/1.1 error response that closes the connection, in the API's JSON form.

    Written straight to the transport: it answers requests the application never saw.
    """
    code = {408: "DEADLINE_EXCEEDED", 503: "UNAVAILABLE"}.get(status, "INVALID_ARGUMENT")
    body = json.dumps({"error": message, "message": message, "code": code}).encode()
    lines = [
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}".encode(),
        b"content-type: application/json",
        b"content-length: " + str(len(body)).encode(),
        b"connection: close",
        *(name + b": " + value for name, value in SECURITY_HEADERS),
    ]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


@dataclass(frozen=True)
class Deadlines:
    head: float
    body: float


class ListenerSlots:
    """The connections of one listener, and which of them wait for a request head."""

    def __init__(self, name: str, cap: int) -> None:
        self.name = name
        self.cap = cap
        name = name.replace("%", "%%")  # it goes into log templates
        self.open: set[GuardedHttpProtocol] = set()
        # Insertion-ordered: the first key has waited longest.
        self.waiting: dict[GuardedHttpProtocol, None] = {}
        self.head_timeouts = ThrottledLog(
            f"{name}: closed %d connection(s) that did not send a request head in time"
        )
        self.head_too_large = ThrottledLog(
            f"{name}: closed %d connection(s) whose request head passed {MAX_HEAD // 1024} KiB"
        )
        self.body_timeouts = ThrottledLog(
            f"{name}: closed %d connection(s) that did not send a request body in time"
        )
        self.evicted = ThrottledLog(
            f"{name}: {cap} connections open (server.max_connections); closed %d that "
            "waited longest for a request head to make room"
        )
        self.refused = ThrottledLog(
            f"{name}: {cap} connections open and all busy (server.max_connections); refused %d"
        )

    def admit(self, conn: GuardedHttpProtocol) -> bool:
        if len(self.open) >= self.cap:
            victim = next(iter(self.waiting), None)
            if victim is None:
                self.refused.count()
                return False
            self.evicted.count()
            victim.close()
        self.open.add(conn)
        return True

    def mark_waiting(self, conn: GuardedHttpProtocol, *, newly: bool = False) -> None:
        if newly:
            self.waiting.pop(conn, None)
        if conn in self.open:
            self.waiting.setdefault(conn, None)

    def mark_busy(self, conn: GuardedHttpProtocol) -> None:
        self.waiting.pop(conn, None)

    def release(self, conn: GuardedHttpProtocol) -> None:
        self.open.discard(conn)
        self.waiting.pop(conn, None)


Incoming = Literal["idle", "head", "body", "done"]


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with head and body deadlines and a listener's connection cap.

    httptools (llhttp, in C) rather than h11: the parser is where a small call spent a third of
    its time in the daemon. Its callbacks tell where the incoming request stands; ``_incoming``
    and ``_outstanding`` keep what the deadlines need, because ``self.cycle`` is always the
    newest request, not necessarily the one being answered (pipelining).
    """

    def __init__(
        self,
        config: uvicorn.Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        *,
        slots: ListenerSlots,
        deadlines: Deadlines,
    ) -> None:
        super().__init__(config, server_state, app_state)
        self.slots = slots
        self.deadlines = deadlines
        self._timer: asyncio.TimerHandle | None = None
        self._awaiting: Literal["head", "body"] | None = None
        self._incoming: Incoming = "idle"  # the part of the next request being received
        self._outstanding = 0  # requests whose head is in and whose response is not complete
        self._head_bytes = 0  # of the head being received, in the reads after its first

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # Every write from here on, uvicorn's included, goes through the batch.
        self.batch = BatchedWrites(transport, self.loop)
        self.transport = self.batch
        if not self.slots.admit(self):
            message = f"too many connections ({self.slots.cap}); retry shortly"
            transport.write(plain_response(503, message))
            transport.close()
            return
        self.slots.mark_waiting(self)
        self._expect("head")

    def connection_lost(self, exc: Exception | None) -> None:
        self._expect(None)
        self.slots.release(self)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        in_head = self._incoming == "head"
        super().data_received(data)
        if in_head and self._incoming == "head" and not self.transport.is_closing():
            # The whole read went into a head that is still not complete.
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD:
                self._refuse_head()
                return
        self._follow_request()

    # The parser's callbacks, in the order a request goes through them.
    def on_message_begin(self) -> None:
        self._incoming = "head"
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        self._incoming = "body"
        self._head_bytes = 0
        self._outstanding += 1
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._incoming = "done"
        super().on_message_complete()

    def on_response_complete(self) -> None:
        self.batch.flush()  # the whole response leaves now, in one write
        self._outstanding = max(self._outstanding - 1, 0)
        super().on_response_complete()
        if self.transport.is_closing():
            return
        if self._outstanding == 0 and self._incoming in ("idle", "done"):
            # Idle between requests: uvicorn's keep-alive timer bounds this wait.
            self._incoming = "idle"
            self._expect(None)
            self.slots.mark_waiting(self, newly=True)
        else:
            self._follow_request()

    def send_400_response(self, msg: str) -> None:
        # uvicorn's own 400 lacks the headers every response carries.
        self._expect(None)
        # The 400 answers the request in hand, unless its answer has begun or an earlier
        # (pipelined) request is still owed one; then the connection just closes.
        in_hand = self._outstanding == 0 or (
            self._outstanding == 1 and self._incoming == "body" and not self.cycle.response_started
        )
        if in_hand:
            self.transport.write(plain_response(400, msg))
        self.transport.close()

    def _refuse_head(self) -> None:
        self._expect(None)
        self.slots.head_too_large.count()
        message = f"request head larger than {MAX_HEAD // 1024} KiB"
        if self._outstanding == 0:  # no answer owed to an earlier request on this connection
            self.transport.write(plain_response(431, message))
        self.transport.close()

    def close(self) -> None:
        """Drop the connection now (the listener needs its slot)."""
        self._expect(None)
        self.slots.release(self)
        self.transport.close()

    def _follow_request(self) -> None:
        if self.transport.is_closing():
            return
        if self._incoming == "body" and self._outstanding <= 1:
            self.slots.mark_busy(self)  # the body of the request being handled
            self._expect("body")
        elif self._outstanding:
            self.slots.mark_busy(self)  # answering; what follows waits for the answer
            self._expect(None)
        else:
            self.slots.mark_waiting(self)  # nothing, or part of a head, received
            self._expect("head")

    def _expect(self, part: Literal["head", "body"] | None) -> None:
        """Arm the deadline for ``part`` unless it already runs; None disarms."""
        if part is not None and part == self._awaiting:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._awaiting = part
        if part is not None:
            delay = self.deadlines.head if part == "head" else self.deadlines.body
            self._timer = self.loop.call_later(delay, self._deadline_passed)

    def _deadline_passed(self) -> None:
        part, self._timer, self._awaiting = self._awaiting, None, None
        if self.transport.is_closing():
            return
        if part == "head":
            self.slots.head_timeouts.count()
            seconds = f"{self.deadlines.head:g}"
            message = f"request head not received within {seconds} s (server.header_timeout)"
            self.transport.write(plain_response(408, message))
        else:
            self.slots.body_timeouts.count()
        self.transport.close()


def protocol_factory(
    config: uvicorn.Config,
    server_state: ServerState,
    app_state: dict[str, Any],
    slots: ListenerSlots,
    deadlines: Deadlines,
) -> Callable[[], GuardedHttpProtocol]:
    """What ``loop.create_server`` needs for one listener."""

    def make() -> GuardedHttpProtocol:
        return GuardedHttpProtocol(config, server_state, app_state, slots=slots, deadlines=deadlines)

    return make
