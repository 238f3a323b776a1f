"""``GET /events``: the daemon's event bus as Server-Sent Events.

``GET /events[?id=<vm>[&id=<vm>...]]`` answers ``text/event-stream``. Each event is::

    id: <seq>
    event: vm
    data: {"seq": ..., "vm_id": ..., "event": "vmm.started", "body": ..., "timestamp": ...,
           "status": "running"}

A client that sends ``Last-Event-ID`` (browsers' EventSource do on reconnect;
``?last_event_id=`` works too; ``0`` asks for the whole history) first gets the events after
that id still in the bounded history; if some are no longer there it gets an ``event: reset``
first, meaning "re-read the state with Status". A comment line (``: heartbeat``) goes out after
``heartbeat`` idle seconds, so proxies keep the connection and a vanished client is noticed on
the write. The stream's first comment says how many subscribers the bus has (so tests and
operators can see that closed streams are gone). ``?follow=false`` ends the stream after the
replay (``vmm-cli events`` without ``-f``).

The response watches the client's side of the connection while it waits: a disconnect ends the
stream and drops the subscription at once, not at the next heartbeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable, Mapping

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from vmm.core.exceptions import InvalidField, VmmError
from vmm.core.names import VM_ID, is_valid_name
from vmm.prpc.bridge import error_payload
from vmm.vms.events import Event, EventBus, Subscription

MEDIA_TYPE = "text/event-stream; charset=utf-8"
RETRY_MS = 3000
MAX_IDS = 100


def format_event(event: Event) -> bytes:
    data = json.dumps(event.as_json(), separators=(",", ":"))
    return f"id: {event.seq}\nevent: vm\ndata: {data}\n\n".encode()


def format_reset(last_seq: int) -> bytes:
    data = json.dumps({"reason": "events after your id are no longer in the history",
                       "seq": last_seq})
    return f"id: {last_seq}\nevent: reset\ndata: {data}\n\n".encode()


def parse_last_id(request: Request) -> int | None:
    raw = request.headers.get("last-event-id")
    field = "Last-Event-ID"
    if raw is None:
        raw = request.query_params.get("last_event_id")
        field = "last_event_id"
    if raw is None or raw == "":
        return None
    if not raw.isascii() or not raw.isdigit() or len(raw) > 20:
        raise InvalidField(field, f"expected an event id (a non-negative integer), got {raw!r}")
    return int(raw)


def parse_bool(params: Mapping[str, str], name: str, *, default: bool) -> bool:
    raw = params.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in ("", "1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise InvalidField(name, f"expected a boolean (true/false/1/0/yes/no/on/off), got {raw!r}")


def parse_ids(request: Request) -> list[str]:
    ids = [i for raw in request.query_params.getlist("id") for i in raw.split(",") if i]
    if len(ids) > MAX_IDS:
        raise InvalidField("id", f"at most {MAX_IDS} VM ids, got {len(ids)}")
    for vm_id in ids:
        if not is_valid_name(vm_id, VM_ID):
            raise InvalidField("id", f"{vm_id!r} is not a VM id")
    return ids


class EventStream(Response):
    """Streams one subscription; ends when the client leaves, whatever it is waiting on."""

    media_type = MEDIA_TYPE

    def __init__(self, bus: EventBus, vm_ids: list[str], last_id: int | None,
                 heartbeat: float, *, follow: bool = True) -> None:
        # Not Response.__init__: it would declare a Content-Length for the (empty) body.
        self.status_code = 200
        self.background = None
        self.raw_headers = [
            (b"content-type", MEDIA_TYPE.encode()),
            (b"cache-control", b"no-store"),
            (b"x-accel-buffering", b"no"),
        ]
        self.bus = bus
        self.vm_ids = vm_ids
        self.last_id = last_id
        self.heartbeat = heartbeat
        self.follow = follow

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # The subscription starts before anything is sent, so nothing published between the
        # replay and the live part is lost (an event in both is sent once: ids only grow).
        with self.bus.subscribe(self.vm_ids) as sub:
            writer = asyncio.ensure_future(self._write(sub, send))
            watcher = asyncio.ensure_future(_wait_disconnect(receive))
            try:
                await asyncio.wait({writer, watcher}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (writer, watcher):
                    task.cancel()
                for task in (writer, watcher):
                    with contextlib.suppress(asyncio.CancelledError, OSError):
                        await task

    async def _write(self, sub: Subscription, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        head = f"retry: {RETRY_MS}\n: subscribers {self.bus.subscriber_count}\n\n".encode()
        await send({"type": "http.response.body", "body": head, "more_body": True})
        sent = self.bus.last_seq
        if self.last_id is not None:
            replay = self.bus.replay(self.last_id, self.vm_ids)
            chunks = [format_reset(self.bus.last_seq)] if replay.gap else []
            chunks += [format_event(e) for e in replay.events]
            sent = max([self.last_id, *(e.seq for e in replay.events)])
            if chunks:
                await send({"type": "http.response.body", "body": b"".join(chunks),
                            "more_body": True})
        if not self.follow:
            await send({"type": "http.response.body", "body": b""})
            return
        while True:
            event = await sub.next(self.heartbeat)
            if event is None:
                if sub.lagged:
                    # Too far behind: end, and let the client resume from its last id.
                    await send({"type": "http.response.body", "body": b""})
                    return
                await send({"type": "http.response.body", "body": b": heartbeat\n\n",
                            "more_body": True})
                continue
            if event.seq <= sent:
                continue  # already sent in the replay
            sent = event.seq
            await send({"type": "http.response.body", "body": format_event(event),
                        "more_body": True})


async def _wait_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


def events_route(bus: Callable[[], EventBus], *, heartbeat: float = 15.0) -> Route:
    """The ``GET /events`` route over the bus ``bus()`` returns (late-bound: the manager)."""

    async def events(request: Request) -> Response:
        try:
            vm_ids = parse_ids(request)
            last_id = parse_last_id(request)
            heartbeat_s = heartbeat
            raw = request.query_params.get("heartbeat")
            if raw is not None:
                try:
                    heartbeat_s = float(raw)
                except ValueError:
                    raise InvalidField("heartbeat", f"expected seconds, got {raw!r}") from None
                if not 0.05 <= heartbeat_s <= 300:
                    raise InvalidField("heartbeat", "must be between 0.05 and 300 seconds")
            follow = parse_bool(request.query_params, "follow", default=True)
        except VmmError as exc:
            return error_payload(exc.message, exc.code, exc.status_code, use_json=True)
        if request.method == "HEAD":
            return Response(media_type=MEDIA_TYPE)
        return EventStream(bus(), vm_ids, last_id, heartbeat_s, follow=follow)

    return Route("/events", events, methods=["GET", "HEAD"])
