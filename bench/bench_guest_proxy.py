"""/guest/SysInfo latency through the daemon's proxy against a direct call to the agent.

One VM boots with the development image. First N calls go through the daemon
(HTTP -> /guest proxy -> serial channel -> agent). Then the daemon is killed (the VM keeps
running), which frees QEMU's end of the agent's virtio-serial socket, and N calls go straight to
the agent over that socket with the same channel code. p50/p99 of both and the ratio are
printed; nothing passes or fails on a time.

    .venv/bin/python bench/bench_guest_proxy.py [--calls 200]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    image = ensure_guest_image()
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
                client.post("/guest/SysInfo?json", json={"id": vm_id}).raise_for_status()
                proxied = []
                for _ in range(args.calls):
                    t0 = time.perf_counter()
                    client.post("/guest/SysInfo?json", json={"id": vm_id}).raise_for_status()
                    proxied.append(time.perf_counter() - t0)
            daemon.kill()  # SIGKILL: the VM lives on, and its agent socket is free again
            straight = asyncio.run(direct(workdir / "state" / "vm" / vm_id / "agent.sock", args.calls))
        finally:
            daemon.destroy()
        for label, values in (("direct to the agent (serial)", straight), ("via /guest proxy", proxied)):
            print(f"{label:30s} p50 {statistics.median(values) * 1e3:7.2f} ms   "
                  f"p99 {percentile(values, 0.99) * 1e3:7.2f} ms   ({len(values)} calls)")
        ratio = statistics.median(proxied) / statistics.median(straight)
        print(f"ratio p50 proxy/direct         {ratio:.2f}")


if __name__ == "__main__":
    main()
