"""The agent as a client of the VMM's HostApi (Info, Notify, GetSealingKey), in pRPC JSON.

Transport, chosen once at boot (``choose``):

1. an explicit ``--host-api-port PATH`` (tests): frames on that port or socket;
2. vsock, when this guest has a vsock CID: HTTP to ``host_api_url`` from the share's
   .sys-config.json (``vsock://2:<port>/api``; port 10000 if the file does not say);
3. the virtio-serial port named org.vmm.host-api: frames (guest_agent.framing);
4. nothing: calls fail, boot goes on.

Notifications go through ``Notifier``: a queue drained by one thread, so events reach the host
in order and boot never waits on a host that is slow or not listening.
"""

import itertools
import json
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path

from guest_agent import httpclient
from guest_agent.channel import PortChannel, find_port, frames_of
from guest_agent.framing import (
    REQUEST,
    RESPONSE,
    FrameError,
    decode_response,
    encode_frame,
    encode_request,
)

HOST_API_PORT_NAME = "org.vmm.host-api"
SYS_CONFIG_FILE = ".sys-config.json"
DEFAULT_VSOCK_PORT = 10000
CALL_TIMEOUT = 5.0
JSON = "application/json"

Log = Callable[[str], None]


class HostApiError(Exception):
    pass


class HostApi:
    """pRPC JSON calls; subclasses move the bytes."""

    description = "none"

    def exchange(self, path: str, body: bytes, timeout: float) -> tuple[int, bytes]:
        raise HostApiError("no host API channel")

    def call(self, method: str, request: object = None, timeout: float = CALL_TIMEOUT) -> object:
        body = b"" if request is None else json.dumps(request).encode()
        status, payload = self.exchange(f"/api/{method}?json", body, timeout)
        try:
            value = json.loads(payload) if payload.strip() else None
        except ValueError:
            raise HostApiError(f"{method}: the host sent a non-JSON answer") from None
        if status != 200:
            message = value.get("error") if isinstance(value, dict) else None
            raise HostApiError(f"{method}: {message or f'HTTP {status}'}")
        return value

    def info(self) -> object:
        return self.call("Info")

    def notify(self, event: str, payload: str, timeout: float = CALL_TIMEOUT) -> None:
        self.call("Notify", {"event": event, "payload": payload}, timeout)

    def get_sealing_key(self, quote: bytes) -> object:
        return self.call("GetSealingKey", {"quote": quote.hex()})


class VsockHostApi(HostApi):
    """HTTP/1.1 over vsock, one connection per call (the host API's production transport)."""

    def __init__(self, cid: int, port: int, prefix: str = "/api") -> None:
        self.cid, self.port, self.prefix = cid, port, prefix.rstrip("/")
        self.description = f"vsock://{cid}:{port}{self.prefix}"
        self.connect = httpclient.vsock_connector(cid, port)

    def exchange(self, path: str, body: bytes, timeout: float) -> tuple[int, bytes]:
        full = self.prefix + path.removeprefix("/api")
        try:
            status, _ctype, payload = httpclient.request(
                self.connect,
                "POST",
                full,
                body=body,
                content_type=JSON,
                timeout=timeout,
            )
        except OSError as exc:
            raise HostApiError(f"{self.description}: {exc}") from None
        return status, payload


class SerialHostApi(HostApi):
    """Frames on a virtio-serial port, one call per request id.

    Ids increase; an answer with an id nobody waits for (late, or from before a restart) is
    dropped.
    """

    def __init__(self, channel: PortChannel) -> None:
        self.channel = channel
        self.description = f"serial {channel.path}"
        # Ids start at the clock so an answer meant for a previous run of the agent (it is
        # restarted if it dies) cannot match a call of this one.
        self._ids = itertools.count(time.time_ns() // 1000)
        self._pending: dict[int, list[bytes]] = {}
        self._events: dict[int, threading.Event] = {}
        self._lock = threading.Lock()
        self._reader: threading.Thread | None = None

    def exchange(self, path: str, body: bytes, timeout: float) -> tuple[int, bytes]:
        deadline = time.monotonic() + timeout
        self._start_reader()
        request_id = next(self._ids)
        done = threading.Event()
        slot: list[bytes] = []
        with self._lock:
            self._pending[request_id] = slot
            self._events[request_id] = done
        try:
            frame = encode_frame(REQUEST, request_id, encode_request(path, JSON, body))
            # The channel may still be connecting right after start: give it the whole budget.
            while not self.channel.send(frame, max(deadline - time.monotonic(), 0.0)):
                if time.monotonic() >= deadline:
                    raise HostApiError(f"{self.description}: host not connected (send timed out)")
                time.sleep(0.05)
            if not done.wait(max(deadline - time.monotonic(), 0.0)):
                raise HostApiError(f"{self.description}: no answer within {timeout:g} s")
            status, _ctype, payload = decode_response(slot[0])
        except FrameError as exc:
            raise HostApiError(f"{self.description}: {exc}") from None
        finally:
            with self._lock:
                self._pending.pop(request_id, None)
                self._events.pop(request_id, None)
        return status, payload

    def _start_reader(self) -> None:
        with self._lock:
            if self._reader is None:
                self._reader = threading.Thread(target=self._read, name="host-api", daemon=True)
                self._reader.start()

    def _read(self) -> None:
        for frame in frames_of(self.channel, RESPONSE):
            with self._lock:
                slot, event = self._pending.get(frame.id), self._events.get(frame.id)
                if slot is not None and event is not None and not slot:
                    slot.append(frame.payload)
                    event.set()


def parse_host_api_url(url: str) -> tuple[int, int, str] | None:
    """(cid, port, path prefix) of ``vsock://CID:PORT/PATH``; None if it is not such a URL."""
    if not url.startswith("vsock://"):
        return None
    rest = url.removeprefix("vsock://")
    hostport, slash, path = rest.partition("/")
    cid, colon, port = hostport.partition(":")
    try:
        return int(cid), int(port) if colon else DEFAULT_VSOCK_PORT, "/" + path if slash else "/api"
    except ValueError:
        return None


def vsock_target(share_dir: Path) -> tuple[int, int, str]:
    try:
        config = json.loads((share_dir / SYS_CONFIG_FILE).read_bytes())
        url = config.get("host_api_url") if isinstance(config, dict) else None
        parsed = parse_host_api_url(url) if isinstance(url, str) else None
    except (OSError, ValueError):
        parsed = None
    return parsed or (2, DEFAULT_VSOCK_PORT, "/api")


def choose(
    share_dir: Path,
    port_override: Path | None,
    vsock_cid: int | None,
    log: Log,
) -> HostApi | None:
    if port_override is not None:
        return SerialHostApi(PortChannel(port_override, log))
    if vsock_cid is not None:
        return VsockHostApi(*vsock_target(share_dir))
    port = find_port(HOST_API_PORT_NAME)
    if port is not None:
        return SerialHostApi(PortChannel(port, log))
    return None


_Item = tuple[str, str, threading.Event]


class Notifier:
    """Ordered, non-blocking Notify: events queue up until ``attach`` gives a transport."""

    def __init__(self, log: Log) -> None:
        self._log = log
        self._queue: queue.SimpleQueue[_Item] = queue.SimpleQueue()
        self._api: HostApi | None = None
        self._thread: threading.Thread | None = None

    def attach(self, api: HostApi | None) -> None:
        self._api = api
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="notifier", daemon=True)
            self._thread.start()

    def notify(self, event: str, payload: str) -> threading.Event:
        """Queue a notification; the returned event is set once it was sent (or given up)."""
        done = threading.Event()
        self._queue.put((event, payload, done))
        return done

    def notify_wait(self, event: str, payload: str, timeout: float) -> bool:
        """Queue a notification and wait up to ``timeout`` for it to be handled."""
        return self.notify(event, payload).wait(timeout)

    def _run(self) -> None:
        while True:
            event, payload, done = self._queue.get()
            try:
                if self._api is None:
                    continue
                self._api.notify(event, payload)
            except HostApiError as exc:
                self._log(f"notify {event} {payload!r} failed: {exc}")
            finally:
                done.set()
