"""Requests per second of /prpc/Version (JSON) against a bare Starlette route, same server.

The server runs in a child process with the daemon's real app plus one extra route, /bare,
that returns the very bytes Version returns, behind the same middleware. The load generator
(this process) alternates the two paths every half second within each round, so that the
machine's load, which on a shared host swings by half within seconds, hits both alike; it
prints both rates per round, the median of the rounds' own ratios, and the server's CPU time
per request of each path, read from /proc (what the path costs, whatever else the machine
runs). It never passes or fails on a time.

    .venv/bin/python bench/bench_prpc.py [--seconds 3] [--rounds 3] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.support.daemon_proc import kill_vm_processes

ROOT = Path(__file__).resolve().parent.parent

SERVER = """
import asyncio, sys
from starlette.responses import Response
from starlette.routing import Route
from vmm.prpc import codec
from vmm.core.version import __version__, git_revision
from vmm.api.app import build_app
from vmm.core.config import Config
from vmm.daemon import Daemon
from vmm.rpc import vmm_rpc_pb2 as pb
from vmm.api.server import listeners, serve

config = Config(address="tcp:127.0.0.1:" + sys.argv[1], log_level="warning")
app = build_app(Daemon(config))
body = codec.to_json_bytes(pb.VersionResponse(version=__version__, rev=git_revision()))

async def bare(request):
    return Response(body, media_type="application/json")

app.router.routes.append(Route("/bare", bare, methods=["GET", "POST"]))
with listeners(config) as sockets:
    asyncio.run(serve(app, config, sockets))
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


SLICE = 0.5  # seconds of one path before the other's turn


async def measure(port: int, path: str, seconds: float, concurrency: int) -> float:
    """Requests per second over ``concurrency`` keep-alive connections.

    A minimal raw HTTP/1.1 client: each request is one write with TCP_NODELAY, so the figure is
    the server's, not a client library's (httpx writes headers and body separately and then
    stalls 40 ms on delayed ACKs).
    """
    body = b"{}"
    request = (
        f"POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    deadline = time.perf_counter() + seconds
    count = 0

    async def worker() -> None:
        nonlocal count
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            while time.perf_counter() < deadline:
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                if not head.startswith(b"HTTP/1.1 200"):
                    raise RuntimeError(f"{path}: {head[:80]!r}")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                await reader.readexactly(length)
                count += 1
        finally:
            writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return count / (time.perf_counter() - start)


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time the process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure_round(pid: int, port: int, paths: tuple[str, ...], *, seconds: float,
                  concurrency: int, flip: bool) -> dict[str, tuple[float, float]]:
    """Per path: (requests per second, the server's CPU microseconds per request).

    The paths take turns every ``SLICE`` seconds, for ``seconds`` each in all.
    """
    requests = dict.fromkeys(paths, 0.0)
    elapsed = dict.fromkeys(paths, 0.0)
    cpu = dict.fromkeys(paths, 0.0)
    for turn in range(max(1, round(seconds / SLICE))):
        for path in paths[::-1] if (turn % 2) ^ flip else paths:
            before, started = cpu_seconds(pid), time.perf_counter()
            rate = asyncio.run(measure(port, path, seconds / round(seconds / SLICE), concurrency))
            took = time.perf_counter() - started
            requests[path] += rate * took
            elapsed[path] += took
            cpu[path] += cpu_seconds(pid) - before
    return {path: (requests[path] / elapsed[path], cpu[path] / requests[path] * 1e6)
            for path in paths}


def wait_ready(base: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.post(f"{base}/bare", timeout=1).status_code == 200:
                return
        time.sleep(0.1)
    raise TimeoutError("bench server did not start")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as cwd:
        server = subprocess.Popen([sys.executable, "-c", SERVER, str(port)], cwd=cwd,
                                  env={**os.environ, "PYTHONPATH": str(ROOT)})
        try:
            wait_ready(base)
            paths = ("/bare", "/prpc/Version")
            results: dict[str, list[tuple[float, float]]] = {path: [] for path in paths}
            asyncio.run(measure(port, "/bare", 0.5, args.concurrency))  # warm-up
            for n in range(args.rounds):
                measured = measure_round(server.pid, port, paths, seconds=args.seconds,
                                         concurrency=args.concurrency, flip=bool(n % 2))
                for path in paths:
                    results[path].append(measured[path])
        finally:
            os.kill(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.kill(server.pid, signal.SIGKILL)
                server.wait()
            # The daemon's start-up launched a supervisor, which outlives it by design.
            kill_vm_processes(Path(cwd) / ".state")
    bare = [rate for rate, _ in results["/bare"]]
    bridge = [rate for rate, _ in results["/prpc/Version"]]
    bare_cpu = [cpu for _, cpu in results["/bare"]]
    bridge_cpu = [cpu for _, cpu in results["/prpc/Version"]]
    ratios = [b / a for a, b in zip(bare, bridge, strict=True)]
    print(f"bare Starlette route : {statistics.median(bare):8.0f} req/s  "
          f"(rounds: {[round(x) for x in bare]})")
    print(f"/prpc/Version (JSON) : {statistics.median(bridge):8.0f} req/s  "
          f"(rounds: {[round(x) for x in bridge]})")
    print(f"server CPU per call  : bare {statistics.median(bare_cpu):.0f} us, bridge "
          f"{statistics.median(bridge_cpu):.0f} us, ratio bare/bridge "
          f"{statistics.median(bare_cpu) / statistics.median(bridge_cpu):.2f}")
    print(f"ratio bridge/bare    : {statistics.median(ratios):.2f}  (median of the rounds' "
          f"{[round(x, 2) for x in ratios]}; aim >= 0.90)")


if __name__ == "__main__":
    main()
