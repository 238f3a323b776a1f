"""/guest/SysInfo latency through the daemon's proxy against a direct call to the agent.

One VM boots with the development image. Each round, N calls go through the daemon
(HTTP -> /guest proxy -> serial channel -> agent) and N go straight to the agent over QEMU's end
of its virtio-serial socket with the same channel code, which needs the daemon gone: it is
killed (the VM keeps running) and started again (it adopts the VM). The order flips every round
(through, kill, straight; then straight, start, through) so that the guest's speed under TCG,
which drifts with the host's load, hits both alike, and the median of the rounds' own ratios is
printed beside the ratio of the overall medians. The HTTP client is a minimal keep-alive one
(one write per request, TCP_NODELAY, as in bench_prpc), so the figure is the daemon's, not a
client library's. p50/p99 of both, per round and overall, and the ratio are printed; nothing
passes or fails on a time.

    .venv/bin/python bench/bench_guest_proxy.py [--calls 200] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from guest_proxy.transport import GuestAgentClient, SerialTransport  # noqa: E402
from tests.support.daemon_proc import start_daemon  # noqa: E402
from tests.support.guest_image import ensure_guest_image  # noqa: E402
from tests.support.short_dirs import short_dir  # noqa: E402

COMPOSE = json.dumps({"runner": "docker-compose"})


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(q * len(ordered)), len(ordered) - 1)]


async def direct(socket_path: Path, calls: int) -> list[float]:
    client = GuestAgentClient(SerialTransport(socket_path))
    samples = []
    try:
        await client.call("SysInfo", timeout=30)  # connect and warm up
        for _ in range(calls):
            t0 = time.perf_counter()
            await client.call("SysInfo")
            samples.append(time.perf_counter() - t0)
    finally:
        await client.close()
    return samples


async def proxied(base_url: str, vm_id: str, calls: int) -> list[float]:
    address = urlsplit(base_url)
    reader, writer = await asyncio.open_connection(address.hostname, address.port)
    writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    body = json.dumps({"id": vm_id}).encode()
    request = (f"POST /guest/SysInfo?json HTTP/1.1\r\nHost: bench\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
               ).encode() + body

    async def one() -> None:
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"/guest/SysInfo: {head[:80]!r}")
        length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        await reader.readexactly(length)

    samples = []
    try:
        await one()  # warm-up
        for _ in range(calls):
            t0 = time.perf_counter()
            await one()
            samples.append(time.perf_counter() - t0)
    finally:
        writer.close()
    return samples


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    image = ensure_guest_image()
    rounds: list[tuple[list[float], list[float]]] = []
    with short_dir("bg") as workdir:
        config = f'[image]\npath = "{image.parent}"\n[cvm]\naccel = "tcg"\n'
        daemon = start_daemon(workdir, extra_config=config)
        try:
            with daemon.client() as client:
                vm_id = client.post("/prpc/CreateVm?json", json={
                    "name": "bench", "image": image.name, "compose_file": COMPOSE, "vcpu": 1,
                    "memory": 512, "disk_size": 2}).json()["id"]
                deadline = time.monotonic() + 180
                while client.post("/prpc/GetInfo?json", json={"id": vm_id}).json()["info"][
                        "boot_progress"] != "done":
                    if time.monotonic() > deadline:
                        raise TimeoutError("the VM did not finish booting")
                    time.sleep(0.2)
            agent_socket = workdir / "state" / "vm" / vm_id / "agent.sock"
            for n in range(args.rounds):
                if n % 2 == 0:  # the daemon is up: through it first, then straight
                    via = asyncio.run(proxied(daemon.base_url, vm_id, args.calls))
                    daemon.kill()  # SIGKILL: the VM lives on, and its agent socket is free again
                    straight = asyncio.run(direct(agent_socket, args.calls))
                else:  # the daemon is down: straight first, then through it
                    straight = asyncio.run(direct(agent_socket, args.calls))
                    daemon = start_daemon(workdir, extra_config=config)
                    via = asyncio.run(proxied(daemon.base_url, vm_id, args.calls))
                rounds.append((straight, via))
        finally:
            daemon.destroy()
    for n, (straight, via) in enumerate(rounds, 1):
        print(f"round {n}: direct p50 {statistics.median(straight) * 1e3:6.2f} ms, via proxy p50 "
              f"{statistics.median(via) * 1e3:6.2f} ms, ratio "
              f"{statistics.median(via) / statistics.median(straight):.2f}")
    straight = [x for r in rounds for x in r[0]]
    proxied_all = [x for r in rounds for x in r[1]]
    for label, values in (("direct to the agent (serial)", straight),
                          ("via /guest proxy", proxied_all)):
        print(f"{label:30s} p50 {statistics.median(values) * 1e3:7.2f} ms   "
              f"p99 {percentile(values, 0.99) * 1e3:7.2f} ms   ({len(values)} calls)")
    ratio = statistics.median(proxied_all) / statistics.median(straight)
    per_round = [statistics.median(via) / statistics.median(direct) for direct, via in rounds]
    print(f"ratio p50 proxy/direct         {ratio:.2f}  (median of the rounds' own: "
          f"{statistics.median(per_round):.2f})")


if __name__ == "__main__":
    main()
