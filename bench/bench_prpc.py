"""Requests per second of /prpc/Version (JSON) against a bare Starlette route, same server.

The server runs in a child process with the daemon's real app plus one extra route, /bare,
that returns the very bytes Version returns, behind the same middleware. The load generator
(this process) alternates rounds between the two paths so machine noise hits both alike, and
prints both rates and their ratio. It never passes or fails on a time.

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
            bare, bridge = [], []
            asyncio.run(measure(port, "/bare", 0.5, args.concurrency))  # warm-up
            for _ in range(args.rounds):
                bare.append(asyncio.run(measure(port, "/bare", args.seconds, args.concurrency)))
                bridge.append(
                    asyncio.run(measure(port, "/prpc/Version", args.seconds, args.concurrency))
                )
        finally:
            os.kill(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.kill(server.pid, signal.SIGKILL)
                server.wait()
            # The daemon's start-up launched a supervisor, which outlives it by design.
            kill_vm_processes(Path(cwd) / ".state")
    bare_rps, bridge_rps = statistics.median(bare), statistics.median(bridge)
    print(f"bare Starlette route : {bare_rps:8.0f} req/s  (rounds: {[round(x) for x in bare]})")
    print(f"/prpc/Version (JSON) : {bridge_rps:8.0f} req/s  (rounds: {[round(x) for x in bridge]})")
    print(f"ratio bridge/bare    : {bridge_rps / bare_rps:.2f}  (aim >= 0.70)")


if __name__ == "__main__":
    main()
