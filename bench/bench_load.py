"""Lifecycle calls under read load: the daemon with 1,000 VMs, 200 readers, one writer.

The daemon (``python -m vmm serve``, as in bench_scale) gets ``--vms`` stopped VMs. Then:

1. floor: one client runs CreateVm(stopped) -> UpdateVm -> RemoveVm in a loop for ``--seconds``
   with nothing else running;
2. load: the same writer loop for ``--seconds`` while ``--readers`` keep-alive clients (in a
   child process, so they do not take this process's GIL from the writer) read in a round
   robin: Status brief, Status full, GetInfo, Version, ListImages and /logs.

It prints read throughput and p50/p99 per method, write p50/p99 per call against the floor,
errors, and the daemon's RSS and open fds before and after. All traffic goes to 127.0.0.1 and
is bounded in time (and the writer in count, ``--max-writes``). It never passes or fails on a
time; it prints.

    .venv/bin/python bench/bench_load.py [--vms 1000] [--readers 200] [--seconds 20]
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import multiprocessing
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))

from bench.bench_scale import COMPOSE, Daemon, call, create_vms, p  # noqa: E402
from tests.support.short_dirs import short_dir  # noqa: E402

WRITES = ("CreateVm", "UpdateVm", "RemoveVm")


def reads_for(vm_id: str) -> list[tuple[str, str]]:
    """(label, request line target) of each read in the round robin."""
    return [
        ("Status brief", "/prpc/Status?brief=true"),
        ("Status full", "/prpc/Status?brief=false"),
        ("GetInfo", f"/prpc/GetInfo?id={vm_id}"),
        ("Version", "/prpc/Version"),
        ("ListImages", "/prpc/ListImages"),
        ("/logs", f"/logs?id={vm_id}&lines=20&ch=serial"),
    ]


async def _read_response(reader: asyncio.StreamReader) -> int:
    """Read one HTTP/1.1 response (Content-Length or chunked); return its status."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length, chunked = 0, False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    if not chunked:
        await reader.readexactly(length)
        return status
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        await reader.readexactly(size + 2)
        if size == 0:
            return status


async def _readers(port: int, vm_id: str, clients: int, seconds: float) -> dict[str, Any]:
    targets = reads_for(vm_id)
    samples: dict[str, list[float]] = {label: [] for label, _ in targets}
    errors: dict[str, int] = {label: 0 for label, _ in targets}
    started = time.perf_counter()
    deadline = started + seconds

    async def client(index: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        turn = index
        try:
            while time.perf_counter() < deadline:
                label, target = targets[turn % len(targets)]
                turn += 1
                began = time.perf_counter()
                writer.write(f"GET {target} HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
                status = await _read_response(reader)
                if status == 200:
                    samples[label].append((time.perf_counter() - began) * 1000)
                else:
                    errors[label] += 1
        finally:
            writer.close()

    results = await asyncio.gather(*(client(i) for i in range(clients)), return_exceptions=True)
    failed = [repr(r) for r in results if isinstance(r, BaseException)]
    return {"samples": samples, "errors": errors, "elapsed": time.perf_counter() - started,
            "failed_clients": failed[:5], "failed_count": len(failed)}


def reader_process(port: int, vm_id: str, clients: int, seconds: float, out: Any) -> None:
    out.send(asyncio.run(_readers(port, vm_id, clients, seconds)))
    out.close()


def writer_loop(port: int, seconds: float, max_writes: int) -> tuple[dict[str, list[float]], int]:
    """CreateVm(stopped) -> UpdateVm -> RemoveVm until the time or the count is up."""
    create = json.dumps({"name": "load", "image": "bench-0.5.0", "compose_file": COMPOSE,
                         "vcpu": 1, "memory": 64, "disk_size": 1, "stopped": True}).encode()
    samples: dict[str, list[float]] = {name: [] for name in WRITES}
    errors = 0
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.connect()
    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    deadline = time.perf_counter() + seconds
    done = 0
    while time.perf_counter() < deadline and done < max_writes:
        try:
            began = time.perf_counter()
            vm_id = json.loads(call(conn, "CreateVm", body=create))["id"]
            samples["CreateVm"].append((time.perf_counter() - began) * 1000)
            update = json.dumps({"id": vm_id, "compose_file": COMPOSE.replace("bench", "load"),
                                 "user_config": f"round {done}"}).encode()
            for name, body in (("UpdateVm", update), ("RemoveVm", json.dumps({"id": vm_id}).encode())):
                began = time.perf_counter()
                call(conn, name, body=body)
                samples[name].append((time.perf_counter() - began) * 1000)
        except (RuntimeError, OSError, http.client.HTTPException) as exc:
            errors += 1
            print(f"  write error: {exc}", file=sys.stderr)
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        done += 1
    conn.close()
    return samples, errors


def process_figures(pid: int) -> tuple[float, int]:
    """(RSS in MB, open fds) of a process."""
    rss_kb = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss_kb = int(line.split()[1])
    return rss_kb / 1024, len(list(Path(f"/proc/{pid}/fd").iterdir()))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--vms", type=int, default=1000)
    parser.add_argument("--readers", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--max-writes", type=int, default=2000)
    args = parser.parse_args()
    with short_dir("vmml") as workdir:
        daemon = Daemon(workdir)
        try:
            daemon.write_config(args.vms)
            daemon.start()
            assert daemon.proc is not None
            created = create_vms(daemon.port, args.vms)
            print(f"created {args.vms} stopped VMs in {created:.1f} s")
            conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=60)
            vm_id = json.loads(call(conn, "Status", "?brief=true&page_size=1"))["vms"][0]["id"]
            conn.close()
            log = workdir / "state" / "vm" / vm_id / "serial.log"
            log.write_text("".join(f"boot line {n}\n" for n in range(200)))
            rss0, fds0 = process_figures(daemon.proc.pid)

            floor, floor_errors = writer_loop(daemon.port, args.seconds, args.max_writes)

            parent, child = multiprocessing.Pipe(duplex=False)
            readers = multiprocessing.Process(
                target=reader_process, args=(daemon.port, vm_id, args.readers, args.seconds, child))
            readers.start()
            time.sleep(1.0)  # let every reader connect and the load settle
            loaded, load_errors = writer_loop(daemon.port, args.seconds - 1.0, args.max_writes)
            if not parent.poll(args.seconds + 120):
                raise TimeoutError("the readers did not finish")
            reads = parent.recv()
            readers.join(timeout=30)
            if readers.is_alive():
                readers.kill()
            rss1, fds1 = process_figures(daemon.proc.pid)
        finally:
            daemon.destroy()

    print(f"\n{args.readers} keep-alive readers for {reads['elapsed']:.1f} s, {args.vms} VMs defined")
    total = sum(len(v) for v in reads["samples"].values())
    print(f"  reads: {total} answered ({total / reads['elapsed']:.0f}/s), errors "
          f"{sum(reads['errors'].values())}, clients failed {reads['failed_count']} "
          f"{reads['failed_clients']}")
    for label, values in reads["samples"].items():
        if values:
            print(f"  {label:<13} {len(values) / reads['elapsed']:7.0f}/s  p50 "
                  f"{statistics.median(values):8.1f} ms  p99 {p(values, 0.99):8.1f} ms  "
                  f"errors {reads['errors'][label]}")
    print("\nwrites (one client, CreateVm(stopped) -> UpdateVm -> RemoveVm in a loop)")
    print(f"  floor (no reads): {len(floor['CreateVm'])} rounds, errors {floor_errors};"
          f" under load: {len(loaded['CreateVm'])} rounds, errors {load_errors}")
    for name in WRITES:
        if floor[name] and loaded[name]:
            f50, l50 = statistics.median(floor[name]), statistics.median(loaded[name])
            f99, l99 = p(floor[name], 0.99), p(loaded[name], 0.99)
            print(f"  {name:<9} floor p50 {f50:7.1f} p99 {f99:7.1f} ms | loaded p50 {l50:7.1f} "
                  f"p99 {l99:7.1f} ms (x{l50 / f50:.1f} / x{l99 / f99:.1f} the floor)")
    print(f"\ndaemon RSS {rss0:.0f} MB -> {rss1:.0f} MB, open fds {fds0} -> {fds1}")


if __name__ == "__main__":
    main()
