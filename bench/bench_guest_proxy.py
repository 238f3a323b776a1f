"""/guest/SysInfo latency through the daemon's proxy against a direct call to the agent.

One VM boots with the development image. Calls go in blocks that alternate between the
paths, on the same channel at the same moments of the guest's life:

- through the daemon, over its TCP and its Unix listener: HTTP -> /guest proxy -> the daemon's
  serial connection -> agent;
- straight to the agent, over that very connection, with the same channel code. The bench
  takes a duplicate of the daemon's descriptor (pidfd_getfd) and stops the daemon (SIGSTOP)
  while its block runs, so only the bench reads the answers; SIGCONT ends the block;
- through a bare relay (``guest_relay.py``), a process that only passes the call over a
  duplicate of that connection, with no auth, routing or validation: the least work any proxy
  process does, so the daemon's own cost shows apart from what a process in the middle costs
  on this host (two more wake-ups per call). It runs only in its blocks, the daemon only in its.

A TCG guest's speed drifts by a third within seconds on a shared host, so blocks are short
(``--block`` calls) and many; each path leads in turn, and the first call of each block is
dropped (the side that was stopped wakes cold). Printed: p50/p99 of each path, the ratio of
the medians, the median of the blocks' own ratios, what the daemon adds beyond the bare relay,
and the CPU time per call of the daemon and of the relay (schedstat: what each costs, whatever
the guest's speed). The HTTP client is a minimal keep-alive one (one write per request,
TCP_NODELAY, as in bench_prpc), so the figure is the daemon's, not a client library's. Nothing
passes or fails on a time.

    .venv/bin/python bench/bench_guest_proxy.py [--blocks 40] [--block 25]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import os
import select
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from guest_proxy.transport import GuestAgentClient, SerialTransport  # noqa: E402
from tests.support.daemon_proc import start_daemon  # noqa: E402
from tests.support.guest_image import ensure_guest_image  # noqa: E402
from tests.support.short_dirs import short_dir  # noqa: E402

COMPOSE = json.dumps({"runner": "docker-compose"})
SYS_PIDFD_GETFD = 438  # the same number on every Linux architecture (5.6+)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(q * len(ordered)), len(ordered) - 1)]


def daemon_channel_fd(daemon_pid: int, agent_socket: Path) -> int:
    """The daemon's descriptor for its connection to QEMU's end of ``agent_socket``."""
    lines = subprocess.run(["ss", "-xpnH"], capture_output=True, text=True, check=True,
                           timeout=30).stdout.splitlines()
    # Columns: netid state recv-q send-q local-address local-inode peer-address peer-inode users
    rows = [line.split() for line in lines]
    qemu_end = next(row for row in rows if len(row) > 7 and row[4] == str(agent_socket)
                    and row[1] == "ESTAB")
    ours = next(row for row in rows if len(row) > 8 and row[5] == qemu_end[7])
    marker = f"pid={daemon_pid},fd="
    users = " ".join(ours[8:])
    return int(users.split(marker, 1)[1].split(")", 1)[0])


def duplicate_fd(pid: int, fd: int) -> int:
    pidfd = os.pidfd_open(pid)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        new = libc.syscall(SYS_PIDFD_GETFD, pidfd, fd, 0)
        if new < 0:
            raise OSError(ctypes.get_errno(), "pidfd_getfd")
        return int(new)
    finally:
        os.close(pidfd)


def sched_ns(pid: int) -> int:
    """CPU time of all the process's threads, in ns (schedstat: exact, not tick-sampled)."""
    return sum(int((task / "schedstat").read_text().split()[0])
               for task in Path(f"/proc/{pid}/task").iterdir())


def wait_stopped(pid: int) -> None:
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "T":
        if time.monotonic() > deadline:
            raise TimeoutError("the daemon did not stop")
        time.sleep(0.001)


class HttpClient:
    """One keep-alive connection posting the same request."""

    def __init__(self, address: str | Path, vm_id: str) -> None:
        self.address = address  # a base URL (TCP), or the path of the Unix listener
        body = json.dumps({"id": vm_id}).encode()
        self.request = (f"POST /guest/SysInfo?json HTTP/1.1\r\nHost: bench\r\n"
                        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
                        ).encode() + body

    async def open(self) -> None:
        if isinstance(self.address, Path):
            self.reader, self.writer = await asyncio.open_unix_connection(self.address)
            return
        url = urlsplit(self.address)
        self.reader, self.writer = await asyncio.open_connection(url.hostname, url.port)
        self.writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    async def call(self) -> None:
        self.writer.write(self.request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"/guest/SysInfo: {head[:12]!r} {await self.reader.read(400)!r}")
        length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        await self.reader.readexactly(length)


async def timed(call: Callable[[], Awaitable[object]], count: int) -> list[float]:
    samples = []
    for _ in range(count):
        t0 = time.perf_counter()
        await asyncio.wait_for(call(), 30)
        samples.append(time.perf_counter() - t0)
    return samples[1:]  # the first call of a block wakes a cold side


Block = dict[str, list[float]]  # side -> latencies
SIDES = ("direct", "relay", "tcp", "unix")
RELAY_START_TIMEOUT = 30.0


@contextlib.contextmanager
def stopped(pid: int) -> Iterator[None]:
    """``pid`` stopped (SIGSTOP) for the block; continued in any case."""
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_stopped(pid)
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


@contextlib.contextmanager
def bare_relay(channel_fd: int) -> Iterator[tuple[int, int]]:
    """``guest_relay.py`` on a duplicate of the daemon's channel: (PID, TCP port); killed after."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "bench" / "guest_relay.py"), str(channel_fd)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, pass_fds=(channel_fd,))
    os.close(channel_fd)  # the relay holds its own copy now
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], RELAY_START_TIMEOUT)
        port = proc.stdout.readline().strip() if ready else b""
        if not port:
            raise RuntimeError("the bare relay did not start")
        yield proc.pid, int(port)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGCONT)
        proc.kill()
        proc.wait(timeout=30)


async def alternate(daemon_pid: int, listeners: dict[str, str | Path], vm_id: str,
                    agent_socket: Path, *, blocks: int, block: int
                    ) -> tuple[list[Block], dict[str, int]]:
    """The latencies of each side per block, and the CPU ns of the daemon and of the relay.

    The daemon's channel is read by one process at a time: the daemon runs only in its own
    blocks, the relay only in its own, and neither in the direct blocks.
    """
    clients = {side: HttpClient(address, vm_id) for side, address in listeners.items()}
    for client in clients.values():
        await client.open()
        await client.call()  # the daemon connects its channel, which the other sides then share
    channel_fd = daemon_channel_fd(daemon_pid, agent_socket)

    async def shared() -> socket.socket:
        sock = socket.socket(fileno=duplicate_fd(daemon_pid, channel_fd))
        sock.setblocking(False)
        return sock

    async def direct_block() -> list[float]:
        # A client per block: between blocks nothing of the bench's reads the shared socket
        # (closing a duplicate leaves the daemon's connection open).
        agent = GuestAgentClient(SerialTransport(agent_socket, connect=shared))
        try:
            return await timed(lambda: agent.call("SysInfo"), block)
        finally:
            await agent.close()

    results = []
    cpu = {"daemon": 0, "relay": 0}
    try:
        with bare_relay(duplicate_fd(daemon_pid, channel_fd)) as (relay_pid, relay_port):
            relay_client = HttpClient(f"http://127.0.0.1:{relay_port}", vm_id)
            await relay_client.open()
            os.kill(relay_pid, signal.SIGSTOP)  # it runs only in its own blocks
            wait_stopped(relay_pid)
            for n in range(blocks):
                samples: Block = {}
                for side in SIDES[n % 4:] + SIDES[:n % 4]:  # each side leads in turn
                    if side == "direct":
                        with stopped(daemon_pid):
                            samples[side] = await direct_block()
                    elif side == "relay":
                        with stopped(daemon_pid):
                            os.kill(relay_pid, signal.SIGCONT)
                            try:
                                before = sched_ns(relay_pid)
                                samples[side] = await timed(relay_client.call, block)
                                cpu["relay"] += sched_ns(relay_pid) - before
                            finally:
                                os.kill(relay_pid, signal.SIGSTOP)
                                wait_stopped(relay_pid)
                    else:
                        before = sched_ns(daemon_pid)
                        samples[side] = await timed(clients[side].call, block)
                        cpu["daemon"] += sched_ns(daemon_pid) - before
                results.append(samples)
            relay_client.writer.close()
    finally:
        for client in clients.values():
            client.writer.close()
    return results, cpu


def boot(daemon_url: str, image_name: str) -> str:
    with httpx.Client(base_url=daemon_url, timeout=30) as client:
        vm_id: str = client.post("/prpc/CreateVm?json", json={
            "name": "bench", "image": image_name, "compose_file": COMPOSE, "vcpu": 1,
            "memory": 512, "disk_size": 2}).json()["id"]
        deadline = time.monotonic() + 180
        while client.post("/prpc/GetInfo?json", json={"id": vm_id}).json()["info"][
                "boot_progress"] != "done":
            if time.monotonic() > deadline:
                raise TimeoutError("the VM did not finish booting")
            time.sleep(0.2)
    return vm_id


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--blocks", type=int, default=40)
    parser.add_argument("--block", type=int, default=25, help="calls per block (one dropped)")
    args = parser.parse_args()
    image = ensure_guest_image()
    with short_dir("bg") as workdir:
        config = f'[image]\npath = "{image.parent}"\n[cvm]\naccel = "tcg"\n'
        daemon = start_daemon(workdir, addresses=["tcp:127.0.0.1:0", "unix:./vmm.sock"],
                              extra_config=config)
        try:
            vm_id = boot(daemon.base_url, image.name)
            agent_socket = workdir / "state" / "vm" / vm_id / "agent.sock"
            listeners: dict[str, str | Path] = {"tcp": daemon.base_url, "unix": daemon.unix[0]}
            blocks, cpu = asyncio.run(alternate(
                daemon.pid, listeners, vm_id, agent_socket, blocks=args.blocks, block=args.block))
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(daemon.pid, signal.SIGCONT)
            daemon.destroy()
    every = {side: [x for b in blocks for x in b[side]] for side in SIDES}
    labels = {"direct": "direct to the agent (serial)", "relay": "bare relay process (TCP)",
              "tcp": "via /guest, TCP listener", "unix": "via /guest, Unix listener"}
    for side in SIDES:
        values = every[side]
        print(f"{labels[side]:30s} p50 {statistics.median(values) * 1e3:7.2f} ms   "
              f"p99 {percentile(values, 0.99) * 1e3:7.2f} ms   ({len(values)} calls)")
    calls = len(blocks) * args.block
    print(f"CPU per call: daemon {cpu['daemon'] / 1e3 / (2 * calls):.0f} us, "
          f"bare relay {cpu['relay'] / 1e3 / calls:.0f} us")
    direct = statistics.median(every["direct"])
    for side in ("relay", "tcp", "unix"):
        own = sorted(statistics.median(b[side]) / statistics.median(b["direct"]) for b in blocks)
        print(f"{side:5s}: added p50 {(statistics.median(every[side]) - direct) * 1e3:.2f} ms, "
              f"ratio p50 to direct {statistics.median(every[side]) / direct:.2f} "
              f"(median of the {len(blocks)} blocks' own: {statistics.median(own):.2f}, "
              f"quartiles {own[len(own) // 4]:.2f} / {own[3 * len(own) // 4]:.2f})")
    beyond = sorted(statistics.median(b["tcp"]) - statistics.median(b["relay"]) for b in blocks)
    print(f"the daemon over TCP beyond the bare relay: {statistics.median(beyond) * 1e3:+.2f} ms "
          f"(median of the blocks'; quartiles {beyond[len(beyond) // 4] * 1e3:+.2f} / "
          f"{beyond[3 * len(beyond) // 4] * 1e3:+.2f} ms); aim: /guest <= 1.10 x direct")

if __name__ == "__main__":
    main()
