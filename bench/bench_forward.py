"""A bridge port forward's throughput and added latency: nft DNAT and user space vs direct.

Two network namespaces made for the run: the host side (a bridge, 10.88.0.1/24, where the
forwards live, as under the daemon) and a stand-in guest on a veth port of that bridge
(10.88.0.50) running a TCP sink and a ping-pong responder. The guest is a namespace, not a VM:
under TCG a VM would measure the emulator, not the forward. In the same run, from the host side:

- direct:    client -> 10.88.0.50:P
- nft:       client -> 127.0.0.1:H, DNAT by vmm.net.forwards.NftForwarder (the daemon's rules)
- userspace: client -> 127.0.0.1:H', vmm.net.proxy.UserspaceForwarder (the fallback)

Throughput is MiB/s of one stream of --mib MiB; latency is the p50 of --pings 1-byte round
trips on one connection. Ratios against direct are printed (the issue's aim: nft >= 0.9x,
user space >= 0.5x throughput); nothing passes or fails on a time. Needs root (netns, nft).

    .venv/bin/python bench/bench_forward.py [--mib 256] [--pings 2000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from vmm.net.forwards import Forward, NftForwarder, nft_script  # noqa: E402
from vmm.net.proxy import UserspaceForwarder  # noqa: E402

GUEST_IP = "10.88.0.50"
SINK, PONG = 9000, 9001
NFT_SINK, NFT_PONG, US_SINK, US_PONG = 2100, 2101, 2200, 2201
CHUNK = 256 * 1024

# The stand-in guest's services: a sink that answers one byte once the stream ends, and an echo.
GUEST_SERVER = f"""
import socket, threading
def sink(c):
    while c.recv({CHUNK}): pass
    c.sendall(b"k"); c.close()
def pong(c):
    while (b := c.recv(1)): c.sendall(b)
    c.close()
def serve(port, handler):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("{GUEST_IP}", port)); s.listen(16)
    while True:
        c, _ = s.accept(); threading.Thread(target=handler, args=(c,), daemon=True).start()
threading.Thread(target=serve, args=({SINK}, sink), daemon=True).start()
print("ready", flush=True)
serve({PONG}, pong)
"""


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, timeout=30)


def throughput(host: str, port: int, mib: int) -> float:
    data = b"x" * CHUNK
    with socket.create_connection((host, port), timeout=60) as conn:
        started = time.perf_counter()
        for _ in range(mib * 1024 * 1024 // CHUNK):
            conn.sendall(data)
        conn.shutdown(socket.SHUT_WR)
        conn.recv(1)
        return mib / (time.perf_counter() - started)


def latency(host: str, port: int, pings: int) -> float:
    samples = []
    with socket.create_connection((host, port), timeout=60) as conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(pings):
            started = time.perf_counter()
            conn.sendall(b"p")
            conn.recv(1)
            samples.append(time.perf_counter() - started)
    return statistics.median(samples) * 1e6


async def serve_proxy(routes: list[Forward]) -> None:
    """The user-space forwarder in a process of its own, as in the daemon (no shared GIL)."""
    proxy = UserspaceForwarder()
    await proxy.apply(routes)
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until EOF
    await proxy.close()


def inside(args: argparse.Namespace) -> None:
    """Runs in the host-side namespace: forwards, then the measurements, rounds interleaved."""
    forwards = [Forward("tcp", "127.0.0.1", h, GUEST_IP, g, "br0", "bench")
                for h, g in ((NFT_SINK, SINK), (NFT_PONG, PONG))]  # fmt: skip
    proxy = subprocess.Popen([sys.executable, __file__, "--proxy"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE)  # fmt: skip
    asyncio.run(NftForwarder().apply(forwards))
    try:
        assert proxy.stdout is not None and proxy.stdout.readline().strip() == b"ready"
        paths = {"direct": (GUEST_IP, SINK, PONG), "nft": ("127.0.0.1", NFT_SINK, NFT_PONG),
                 "userspace": ("127.0.0.1", US_SINK, US_PONG)}  # fmt: skip
        for host, sink, _ in paths.values():
            throughput(host, sink, max(1, args.mib // 8))  # warm-up
        rounds: dict[str, list[tuple[float, float]]] = {name: [] for name in paths}
        for _ in range(args.rounds):
            for name, (host, sink, pong) in paths.items():
                rounds[name].append((throughput(host, sink, args.mib),
                                     latency(host, pong, args.pings)))  # fmt: skip
        results = {name: (statistics.median(r[0] for r in rs), statistics.median(r[1] for r in rs))
                   for name, rs in rounds.items()}  # fmt: skip
        direct_mib, direct_us = results["direct"]
        print(f"median of {args.rounds} interleaved rounds; {args.mib} MiB streams, "
              f"{args.pings} pings")  # fmt: skip
        print(f"{'path':<10} {'MiB/s':>9} {'x direct':>9} {'p50 RTT us':>11} {'added us':>9}")
        for name, (mib_s, rtt) in results.items():
            print(f"{name:<10} {mib_s:>9.1f} {mib_s / direct_mib:>9.2f} {rtt:>11.1f} "
                  f"{rtt - direct_us:>9.1f}")  # fmt: skip
    finally:
        if proxy.stdin is not None:
            proxy.stdin.close()
        proxy.wait(timeout=20)
        subprocess.run(["nft", "-f", "-"], input=nft_script([]).encode(), check=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--pings", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--proxy", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.proxy:
        asyncio.run(serve_proxy([Forward("tcp", "127.0.0.1", h, GUEST_IP, g, "br0", "bench")
                                 for h, g in ((US_SINK, SINK), (US_PONG, PONG))]))  # fmt: skip
        return
    if args.inside:
        inside(args)
        return
    host, guest = f"vmmbh{os.getpid()}", f"vmmbg{os.getpid()}"
    server = None
    sh("ip", "netns", "add", host)
    try:
        sh("ip", "netns", "add", guest)
        sh("ip", "-n", host, "link", "set", "lo", "up")
        sh("ip", "-n", host, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", host, "addr", "add", "10.88.0.1/24", "dev", "br0")
        sh("ip", "-n", host, "link", "set", "br0", "up")
        sh("ip", "-n", host, "link", "add", "vh", "type", "veth", "peer", "name", "vg",
           "netns", guest)  # fmt: skip
        sh("ip", "-n", host, "link", "set", "vh", "master", "br0", "up")
        sh("ip", "-n", guest, "addr", "add", f"{GUEST_IP}/24", "dev", "vg")
        sh("ip", "-n", guest, "link", "set", "vg", "up")
        sh("ip", "-n", guest, "link", "set", "lo", "up")
        server = subprocess.Popen(["ip", "netns", "exec", guest, sys.executable, "-c",
                                   GUEST_SERVER], stdout=subprocess.PIPE)  # fmt: skip
        assert server.stdout is not None and server.stdout.readline().strip() == b"ready"
        subprocess.run(["ip", "netns", "exec", host, sys.executable, __file__, "--inside",
                        "--mib", str(args.mib), "--pings", str(args.pings),
                        "--rounds", str(args.rounds)],
                       check=True, timeout=600)  # fmt: skip
    finally:
        if server is not None:
            server.kill()
            server.wait(timeout=10)
        for ns in (guest, host):
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)


if __name__ == "__main__":
    main()
