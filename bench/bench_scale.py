"""The daemon with 1,000 VMs defined: Status latency, start-up time and ReloadVms time.

VMs are created stopped through the API (QEMU never runs), with a placeholder image. Every
figure is printed next to a floor measured in the same run, and as a ratio to it:

- Status (brief, then full) p50/p99 over N calls, floor: Version over the same connection;
- start-up with 1,000 work directories (SIGKILL, restart, until Version answers), floor: the
  same with an empty run directory, the two started in turn;
- ReloadVms with nothing changed, and with every VM's manifest touched (1,000 "updated");
- idle (no calls for ``--idle`` seconds): the CPU time and the runs on a CPU (schedstat, all
  threads) per second of the daemon and of its supervisor, floor: the same with no VM defined.

Aims (issue 4): Status brief p50 <= 25 ms at 1,000 VMs; start-up <= 2 s. It never passes or
fails on a time; it prints.

    .venv/bin/python bench/bench_scale.py [--vms 1000] [--calls 200] [--restarts 7] [--idle 5]
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.short_dirs import short_dir  # noqa: E402

LISTEN_RE = re.compile(r"listening on tcp:127\.0\.0\.1:(\d+)")
COMPOSE = json.dumps({"manifest_version": 2, "name": "bench", "runner": "docker-compose",
                      "docker_compose_file": "services: {}\n"})


class Daemon:
    """``python -m vmm serve`` in ``workdir``; everything it starts is killed by PID."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.state = workdir / "state"
        self.config = workdir / "vmm.toml"
        self.log = workdir / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    def write_config(self, vms: int) -> None:
        s = self.state
        self.config.write_text(
            f'address = "tcp:127.0.0.1:0"\nrun_path = "{s}/vm"\nlog_level = "info"\n'
            f'[image]\npath = "{s}/images"\n'
            f'[cvm]\naccel = "tcg"\ncid_pool_size = {vms + 100}\n'
            f"max_allocable_vcpu = {vms + 100}\nmax_allocable_memory_in_mb = {(vms + 100) * 64}\n"
            f'[supervisor]\nsock = "{s}/run/supervisor.sock"\npid_file = "{s}/run/supervisor.pid"\n'
            f'log_file = "{s}/run/supervisor.log"\nstate_file = "{s}/run/supervisor-state.json"\n'
        )
        image = s / "images" / "bench-0.5.0"
        image.mkdir(parents=True, exist_ok=True)
        for name in ("kernel", "initrd"):
            (image / name).write_bytes(b"\0" * 16)
        (image / "metadata.json").write_text(json.dumps(
            {"kernel": "kernel", "initrd": "initrd", "version": "0.5.0", "is_dev": True}))

    def start(self, timeout: float = 60.0) -> float:
        """Start the daemon; return seconds until Version answers."""
        with self.log.open("ab") as log:
            offset = log.tell()
            began = time.perf_counter()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "vmm", "-c", str(self.config), "serve"],
                cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited:\n{self.log.read_text()[offset:]}")
            with self.log.open("rb") as fp:
                fp.seek(offset)
                match = LISTEN_RE.search(fp.read().decode(errors="replace"))
            if match:
                self.port = int(match.group(1))
                with contextlib.suppress(OSError, http.client.HTTPException):
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1)
                    conn.request("GET", "/prpc/Version")
                    if conn.getresponse().status == 200:
                        conn.close()
                        return time.perf_counter() - began
            time.sleep(0.005)
        raise TimeoutError("daemon did not answer")

    def pids(self) -> list[int]:
        """The daemon's PID and its supervisor's."""
        assert self.proc is not None
        supervisor = int((self.state / "run" / "supervisor.pid").read_text())
        return [self.proc.pid, supervisor]

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=15)

    def destroy(self) -> None:
        self.kill()
        with contextlib.suppress(OSError, ValueError):
            pid = int((self.state / "run" / "supervisor.pid").read_text())
            if b"vmm.supervisor" in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGKILL)


def call(conn: http.client.HTTPConnection, method: str, query: str = "",
         body: bytes | None = None) -> bytes:
    if body is None:
        conn.request("GET", f"/prpc/{method}{query}")
    else:
        conn.request("POST", f"/prpc/{method}?json", body,
                     {"Content-Type": "application/json"})
    response = conn.getresponse()
    data = response.read()
    if response.status != 200:
        raise RuntimeError(f"{method}: {response.status} {data[:200]!r}")
    return data


def latencies(port: int, method: str, query: str, calls: int) -> list[float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    for _ in range(5):
        call(conn, method, query)  # warm-up
    found = []
    for _ in range(calls):
        began = time.perf_counter()
        call(conn, method, query)
        found.append((time.perf_counter() - began) * 1000)
    conn.close()
    return found


def p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(q * len(ordered)), len(ordered) - 1)]


def create_vms(port: int, count: int) -> float:
    body = json.dumps({"name": "bench", "image": "bench-0.5.0", "compose_file": COMPOSE,
                       "vcpu": 1, "memory": 64, "disk_size": 1, "stopped": True}).encode()

    def worker(n: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        for _ in range(n):
            call(conn, "CreateVm", body=body)
        conn.close()

    began = time.perf_counter()
    workers = 4
    with ThreadPoolExecutor(workers) as pool:
        shares = [count // workers + (1 if i < count % workers else 0) for i in range(workers)]
        list(pool.map(worker, shares))
    return time.perf_counter() - began


def timed_call(port: int, method: str) -> tuple[float, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    began = time.perf_counter()
    data = call(conn, method, body=b"{}")
    conn.close()
    return time.perf_counter() - began, data


def idle_load(pids: list[int], seconds: float) -> list[tuple[float, float]]:
    """Per process: (ms of CPU, runs on a CPU) per second over ``seconds`` of no calls."""

    def sample(pid: int) -> tuple[int, int]:
        total_ns = runs = 0
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):  # a worker thread may end meanwhile
                ns, _, count = (task / "schedstat").read_text().split()
                total_ns, runs = total_ns + int(ns), runs + int(count)
        return total_ns, runs

    before = [sample(pid) for pid in pids]
    time.sleep(seconds)
    after = [sample(pid) for pid in pids]
    return [((a[0] - b[0]) / 1e6 / seconds, (a[1] - b[1]) / seconds)
            for b, a in zip(before, after, strict=True)]


def alternate_starts(empty: Daemon, full: Daemon, pairs: int) -> tuple[list[float], list[float]]:
    """Start-up times of each daemon, started in turn (the leader flips every pair).

    Start-up is mostly imports, whose time swings by half with the host's load: starting the two
    in alternation puts both under the same swings, which blocks of one then the other do not.
    """
    times: dict[int, list[float]] = {id(empty): [], id(full): []}
    for n in range(pairs):
        for daemon in (empty, full) if n % 2 == 0 else (full, empty):
            times[id(daemon)].append(daemon.start())
            daemon.kill()
    return times[id(empty)], times[id(full)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--vms", type=int, default=1000)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--restarts", type=int, default=7, help="start-ups of each kind")
    parser.add_argument("--idle", type=float, default=5.0, help="seconds of each idle sample")
    args = parser.parse_args()
    with short_dir("vmmb") as workdir:
        # Two state trees: the floor's run directory stays empty, the other gets the VMs.
        empty, daemon = Daemon(workdir / "empty"), Daemon(workdir / "full")
        try:
            for each in (empty, daemon):
                each.workdir.mkdir()
                each.write_config(args.vms)
            daemon.start()
            created = create_vms(daemon.port, args.vms)
            print(f"created {args.vms} stopped VMs in {created:.1f} s "
                  f"({args.vms / created:.0f}/s over 4 connections)")

            floor = latencies(daemon.port, "Version", "", args.calls)
            brief = latencies(daemon.port, "Status", "?brief=true", args.calls)
            full = latencies(daemon.port, "Status", "?brief=false", args.calls // 4)
            size_brief = len(call(http.client.HTTPConnection("127.0.0.1", daemon.port), "Status",
                                  "?brief=true"))
            size_full = len(call(http.client.HTTPConnection("127.0.0.1", daemon.port), "Status",
                                 "?brief=false"))

            reload_same = [timed_call(daemon.port, "ReloadVms")[0] for _ in range(3)]
            for manifest in (daemon.workdir / "state" / "vm").glob("*/vm-manifest.json"):
                data = json.loads(manifest.read_text())
                manifest.write_text(json.dumps(data | {"name": "edited"}))
            reload_all, answer = timed_call(daemon.port, "ReloadVms")
            time.sleep(1)  # the reload's after-effects settle
            idle_full = idle_load(daemon.pids(), args.idle)
            daemon.kill()
            empty.start()
            time.sleep(1)  # start-up's own work settles
            idle_empty = idle_load(empty.pids(), args.idle)
            empty.kill()
            empty_starts, full_starts = alternate_starts(empty, daemon, args.restarts)
        finally:
            empty.destroy()
            daemon.destroy()

        fl50 = statistics.median(floor)
        print(f"\n{args.vms} VMs defined; latencies over {args.calls} calls on one keep-alive connection")
        print(f"  Version (floor)        p50 {fl50:7.2f} ms  p99 {p(floor, 0.99):7.2f} ms")
        for name, values, size in (("Status brief", brief, size_brief), ("Status full", full, size_full)):
            p50 = statistics.median(values)
            print(f"  {name:<22} p50 {p50:7.2f} ms  p99 {p(values, 0.99):7.2f} ms  "
                  f"({size / 1024:.0f} KiB, x{p50 / fl50:.0f} the floor)")
        print("  aim: Status brief p50 <= 25 ms")
        e50, f50 = statistics.median(empty_starts), statistics.median(full_starts)
        pairs = sorted(f / e for e, f in zip(empty_starts, full_starts, strict=True))
        print(f"\nstart-up until Version answers (median of {args.restarts}, started in turn)")
        print(f"  empty run directory (floor)  {e50:6.2f} s   runs {[round(x, 2) for x in empty_starts]}")
        print(f"  {args.vms} work directories      {f50:6.2f} s   runs "
              f"{[round(x, 2) for x in full_starts]}  (+{f50 - e50:.2f} s, x{f50 / e50:.2f})")
        print(f"  pairs' own ratios            {[round(x, 2) for x in pairs]}  "
              f"(median x{statistics.median(pairs):.2f}; aim <= x1.3, and <= 2 s)")
        print("\nReloadVms")
        print(f"  nothing changed          {statistics.median(reload_same) * 1000:7.1f} ms "
              f"(x{statistics.median(reload_same) * 1000 / fl50:.0f} the Version floor)")
        print(f"  every manifest edited    {reload_all * 1000:7.1f} ms  -> {answer.decode()}")
        print(f"\nidle, {args.idle:g} s without calls (CPU time and runs on a CPU, all threads)")
        for name, (floor_load, load) in zip(("daemon", "supervisor"),
                                            zip(idle_empty, idle_full, strict=True), strict=True):
            print(f"  {name:<10} no VM (floor) {floor_load[0]:5.2f} ms/s {floor_load[1]:5.1f} runs/s"
                  f"   {args.vms} VMs {load[0]:5.2f} ms/s {load[1]:5.1f} runs/s "
                  f"(x{load[0] / floor_load[0]:.1f} the CPU)")


if __name__ == "__main__":
    main()
