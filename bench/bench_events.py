"""The event stream's cost: lifecycle change → SSE client latency, and 100 idle subscribers' toll.

Against the real daemon (a subprocess, placeholder images, VMs that never boot):

1. Latency. A client follows ``/events`` on its own connection while another calls ``StopVm``
   on a stopped VM (a lifecycle step that writes its state and publishes ``vmm.stopped``). For
   each call it records when the RPC's answer arrived and when the event arrived, both from the
   moment the request was sent. The floor is the RPC's own round trip, measured in the same
   call: the ratio says what the stream adds to what a client of the RPC already waits.
2. Idle subscribers. Median ``Status`` latency (brief, with ``--vms`` VMs) with no subscriber,
   then with 100 idle ``/events`` subscribers connected; the ratio is the subscribers' toll.

It prints figures and ratios; it never passes or fails on a time.

    .venv/bin/python bench/bench_events.py [--calls 200] [--vms 50] [--subscribers 100] [--rounds 5]
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.conftest import populate_images
from tests.support.daemon_proc import DaemonProcess, start_daemon
from tests.support.vm_ops import FAKE_IMAGE, create


class EventClock:
    """Follows /events on a raw socket; records when each ``vm_id``'s event line arrived."""

    def __init__(self, daemon: DaemonProcess, vm_id: str) -> None:
        host, port = daemon.base_url.removeprefix("http://").split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=30)
        self.sock.sendall(f"GET /events?id={vm_id} HTTP/1.1\r\nHost: vmm\r\n\r\n".encode())
        self.arrivals: list[float] = []
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        pending = b""
        while True:
            try:
                chunk = self.sock.recv(65536)
            except OSError:
                return
            if not chunk:
                return
            now = time.perf_counter()
            pending += chunk
            count = pending.count(b"\ndata: ")
            if count:
                pending = pending[pending.rfind(b"\ndata: ") + 7:]
                with self.cond:
                    self.arrivals.extend([now] * count)
                    self.cond.notify_all()

    def wait_for(self, count: int, timeout: float = 30.0) -> float:
        with self.cond:
            if not self.cond.wait_for(lambda: len(self.arrivals) >= count, timeout):
                raise TimeoutError("event did not arrive")
            return self.arrivals[count - 1]

    def close(self) -> None:
        self.sock.close()


def latency(daemon: DaemonProcess, client: httpx.Client, calls: int) -> None:
    vm_id = create(client, image=FAKE_IMAGE, name="bench-events", stopped=True)
    clock = EventClock(daemon, vm_id)
    time.sleep(0.5)  # let the subscription's head arrive before the first change
    rpc_times, event_times = [], []
    try:
        for i in range(calls):
            sent = time.perf_counter()
            response = client.post("/prpc/StopVm?json", json={"id": vm_id})
            answered = time.perf_counter()
            response.raise_for_status()
            arrived = clock.wait_for(i + 1)
            rpc_times.append(answered - sent)
            event_times.append(arrived - sent)
    finally:
        clock.close()
    rpc_ms = statistics.median(rpc_times) * 1000
    event_ms = statistics.median(event_times) * 1000
    p95 = sorted(event_times)[int(len(event_times) * 0.95) - 1] * 1000
    print(f"lifecycle change -> SSE client: median {event_ms:.2f} ms (p95 {p95:.2f} ms)")
    print(f"floor, the StopVm round trip itself: median {rpc_ms:.2f} ms")
    print(f"ratio event / RPC answer: {event_ms / rpc_ms:.2f}")


def status_median(client: httpx.Client, calls: int) -> float:
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        client.post("/prpc/Status?json", json={"brief": True}).raise_for_status()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def open_subscribers(daemon: DaemonProcess, count: int) -> list[socket.socket]:
    host, port = daemon.base_url.removeprefix("http://").split(":")
    socks = []
    for _ in range(count):
        sock = socket.create_connection((host, int(port)), timeout=30)
        sock.sendall(b"GET /events?id=nobody HTTP/1.1\r\nHost: vmm\r\n\r\n")
        socks.append(sock)
    for sock in socks:
        head = b""
        while b": subscribers" not in head:
            chunk = sock.recv(4096)
            if not chunk:
                raise RuntimeError("subscriber refused")
            head += chunk
    return socks


def idle_toll(daemon: DaemonProcess, client: httpx.Client, *, calls: int, vms: int,
              subscribers: int, rounds: int) -> None:
    for i in range(vms):
        create(client, image=FAKE_IMAGE, name=f"bench-{i}", stopped=True)
    status_median(client, 20)  # warm up
    # Rounds alternate so the machine's noise (other processes on a shared host) hits both.
    alone, crowded = [], []
    for _ in range(rounds):
        alone.append(status_median(client, calls))
        socks = open_subscribers(daemon, subscribers)
        time.sleep(1.0)  # measure them idle, not the work of accepting them
        try:
            crowded.append(status_median(client, calls))
        finally:
            for sock in socks:
                sock.close()
        time.sleep(1.0)  # and the next "alone" round without their teardown
    a, c = statistics.median(alone), statistics.median(crowded)
    print(f"Status (brief, {vms + 1} VMs), median of {rounds} rounds: {a:.2f} ms alone, "
          f"{c:.2f} ms with {subscribers} idle subscribers")
    print(f"ratio with / without subscribers: {c / a:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--vms", type=int, default=50)
    parser.add_argument("--subscribers", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="vmmb") as tmp:
        workdir = Path(tmp)
        populate_images(workdir / "state" / "images")
        # Stopped VMs still reserve their vCPUs: room for --vms of them.
        config = f"[cvm]\naccel = \"tcg\"\nmax_allocable_vcpu = {args.vms + 8}\n"
        daemon = start_daemon(workdir, extra_config=config)
        try:
            with daemon.client() as client:
                latency(daemon, client, args.calls)
                idle_toll(daemon, client, calls=args.calls, vms=args.vms,
                          subscribers=args.subscribers, rounds=args.rounds)
        finally:
            daemon.destroy()


if __name__ == "__main__":
    main()
