"""Calls per second of Version and Status over native gRPC against the /prpc protobuf bridge.

One daemon (a subprocess, the real app) serves both: its API on TCP and ``grpc_address`` beside
it, with a few stopped VMs so Status has something to list. The load generator (this process,
asyncio, ``--concurrency`` callers) alternates rounds between the transports so machine noise
hits both alike, and prints the medians and the gRPC/bridge ratio. It never passes or fails on
a time.

    .venv/bin/python bench/bench_grpc.py [--seconds 3] [--rounds 3] [--concurrency 8] [--vms 5]
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.empty_pb2 import Empty

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.daemon_proc import start_daemon  # noqa: E402
from tests.support.idle_image import IDLE_IMAGE  # noqa: E402
from tests.support.short_dirs import short_dir  # noqa: E402
from tests.support.vm_ops import COMPOSE, free_port, prepare_images  # noqa: E402
from vmm.rpc import vmm_rpc_pb2 as pb  # noqa: E402
from vmm.rpc.vmm_rpc_pb2_grpc import VmmStub  # noqa: E402

Call = Callable[[], Awaitable[object]]


async def rate(call: Call, seconds: float, concurrency: int) -> float:
    """Completed calls per second of ``concurrency`` callers looping for ``seconds``."""
    done = 0
    deadline = time.perf_counter() + seconds

    async def caller() -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            await call()
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return done / (time.perf_counter() - started)


class RawPrpc:
    """One keep-alive HTTP/1.1 connection per caller, each request one write with TCP_NODELAY.

    httpx writes a request's head and body separately and then stalls 40 ms on delayed ACKs:
    through it the figure would be the client's, not the bridge's.
    """

    def __init__(self, port: int) -> None:
        self.port = port
        self._connections: dict[asyncio.Task[Any] | None, tuple[Any, Any]] = {}

    async def call(self, method: str, body: bytes) -> None:
        task = asyncio.current_task()
        if task not in self._connections:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
            writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._connections[task] = reader, writer
        reader, writer = self._connections[task]
        writer.write(f"POST /prpc/{method} HTTP/1.1\r\nHost: bench\r\n"
                     f"Content-Type: application/octet-stream\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"{method}: {head[:80]!r}")
        length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        await reader.readexactly(length)

    def close(self) -> None:
        for _, writer in self._connections.values():
            writer.close()
        self._connections.clear()


async def measure(http_port: int, grpc_port: int, seconds: float, concurrency: int,
                  rounds: int) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {}
    raw = RawPrpc(http_port)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        stub: Any = VmmStub(channel)  # type: ignore[no-untyped-call]
        empty = Empty().SerializeToString()
        status = pb.StatusRequest(brief=True).SerializeToString()
        calls: dict[str, Call] = {
            "Version gRPC ": lambda: stub.Version(Empty(), timeout=30),
            "Version /prpc": lambda: raw.call("Version", empty),
            "Status  gRPC ": lambda: stub.Status(pb.StatusRequest(brief=True), timeout=30),
            "Status  /prpc": lambda: raw.call("Status", status),
        }
        for call in calls.values():  # warm-up: connections, caches
            await rate(call, 0.3, concurrency)
        for _ in range(rounds):
            for name, call in calls.items():
                results.setdefault(name, []).append(await rate(call, seconds, concurrency))
    raw.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--vms", type=int, default=5)
    args = parser.parse_args()
    with short_dir("vmbg") as workdir:
        prepare_images(workdir)
        grpc_port = free_port()
        daemon = start_daemon(workdir,
                              extra_config=f'grpc_address = "tcp:127.0.0.1:{grpc_port}"\n')
        try:
            with daemon.client() as client:
                # Quiet from here on (start_daemon reads the listening lines at "info").
                client.post("/prpc/SetLogLevel?json", json={"level": "warning"}).raise_for_status()
                for i in range(args.vms):
                    client.post("/prpc/CreateVm?json", json={
                        "name": f"bench-{i}", "image": IDLE_IMAGE, "compose_file": COMPOSE,
                        "vcpu": 1, "memory": 256, "disk_size": 1, "stopped": True,
                    }).raise_for_status()
            http_port = int(daemon.base_url.rsplit(":", 1)[1])
            results = asyncio.run(measure(http_port, grpc_port, args.seconds,
                                          args.concurrency, args.rounds))
        finally:
            daemon.destroy()
    medians = {name: statistics.median(values) for name, values in results.items()}
    for name, values in results.items():
        print(f"{name}: {medians[name]:8.0f} calls/s  (rounds: {[round(v) for v in values]})")
    for method in ("Version", "Status "):
        ratio = medians[f"{method} gRPC "] / medians[f"{method} /prpc"]
        print(f"ratio {method.strip()} gRPC / prpc-protobuf: {ratio:.2f}")


if __name__ == "__main__":
    main()
