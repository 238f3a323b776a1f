"""The fuzz target: a real daemon inside a sentinel tree, its fixture objects, and guarded HTTP.

The daemon owns three directories (VM work directories, images, the supervisor's run dir). Next
to them the sentinel tree plants files the daemon must never touch: siblings of its state dir,
a second images directory, a file inside ``state/`` itself, and an image in the daemon's images
dir that is a symlink to the outside (operators link images in; nothing may follow that link
to delete or write). ``snapshot`` records every path outside the daemon's own directories with
its size and mtime, so any write, delete or create there shows up as a difference.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import populate_images
from tests.support.daemon_proc import DaemonProcess, start_daemon
from tests.support.kms_peer import kms_peer
from tests.support.short_dirs import short_dir
from tests.support.vm_ops import COMPOSE, FAKE_IMAGE

NO_VM_ID = "00000000-0000-4000-8000-000000000000"  # a well-formed id no VM has
LINKED_IMAGE = "linked-image"
SETTLE_TIMEOUT = 60.0

# Port mapping is on so host_address/ports reach QEMU's argv; auto-restart is off so a fuzzed VM
# whose QEMU exits (the placeholder images cannot boot) is not relaunched in the background;
# the vCPU/memory budget is large so the VMs a run creates do not turn every later create into
# a 409 that hides what the request would have reached.
FUZZ_CONFIG = """
[cvm]
accel = "tcg"
max_allocable_vcpu = 100000
max_allocable_memory_in_mb = 100000000
[cvm.port_mapping]
enabled = true
range = [{protocol = "tcp", from = 1024, to = 65535}, {protocol = "udp", from = 1024, to = 65535}]
[cvm.auto_restart]
enabled = false
"""

SERIAL_LOG = (b"boot\n\x1b[31mred\x1b[0m\n\x1b]0;title\x07x\n" + b"y" * 20_000 + b"\n\xff\xfe\xed\xa0\x80\n"
              + b"".join(b"line %d\n" % i for i in range(2_000)) + b"no newline")

Snapshot = dict[str, tuple[str, int, int, str]]  # relative path -> (kind, size, mtime_ns, link)


def snapshot(root: Path, skip: frozenset[Path]) -> Snapshot:
    """Every path under ``root`` but the ``skip`` subtrees: kind, size, mtime and link target."""
    found: Snapshot = {}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if here / d not in skip]
        for name in [*dirnames, *filenames]:
            path = here / name
            if path in skip:
                continue
            st = path.lstat()
            kind = "link" if path.is_symlink() else "dir" if path.is_dir() else "file"
            target = str(path.readlink()) if kind == "link" else ""
            size = 0 if kind == "dir" else st.st_size
            found[str(path.relative_to(root))] = (kind, size, st.st_mtime_ns, target)
    return found


def diff_snapshots(before: Snapshot, after: Snapshot) -> list[str]:
    changes = [f"removed {p}" for p in sorted(before.keys() - after.keys())]
    changes += [f"created {p}" for p in sorted(after.keys() - before.keys())]
    for path in sorted(before.keys() & after.keys()):
        old, new = before[path], after[path]
        what = [name for name, a, b in zip(("kind", "size", "mtime", "link"), old, new, strict=True)
                if a != b]
        if what:
            # A directory whose mtime changed had an entry created or removed directly in it.
            changes.append(f"changed {path} ({', '.join(what)})")
    return changes


def plant_sentinels(workdir: Path) -> Path:
    """Files the daemon has no business touching; returns the outside images directory."""
    outside = workdir / "images"
    populate_images(outside)
    (workdir / "sentinel" / "deep").mkdir(parents=True)
    (workdir / "sentinel" / "notes.txt").write_text("keep me\n")
    (workdir / "sentinel" / "deep" / "data.bin").write_bytes(os.urandom(64))
    (workdir / "state-old" / "vm" / NO_VM_ID).mkdir(parents=True)
    (workdir / "state-old" / "vm" / NO_VM_ID / "vm-manifest.json").write_text("{}")
    (workdir / "state").mkdir(exist_ok=True)
    (workdir / "state" / "keep.txt").write_text("next to the daemon's own directories\n")
    return outside


@dataclass
class FuzzTarget:
    daemon: DaemonProcess
    workdir: Path
    outside_images: Path
    outside_image_names: frozenset[str]
    baseline: Snapshot = field(default_factory=dict)
    stopped_vm: str = ""

    @property
    def state(self) -> Path:
        return self.workdir / "state"

    @property
    def images(self) -> Path:
        return self.state / "images"

    @property
    def own_dirs(self) -> frozenset[Path]:
        """The daemon's own directories (run_path, image.path, supervisor files): free to change."""
        return frozenset({self.state / "vm", self.images, self.state / "run"})

    @property
    def log_path(self) -> Path:
        return self.daemon.log_path

    def snapshot(self) -> Snapshot:
        return snapshot(self.workdir, self.own_dirs | {self.log_path})

    def untouched(self) -> list[str]:
        """What changed outside the daemon's own directories since ``prepare`` (empty: nothing)."""
        changes = diff_snapshots(self.baseline, self.snapshot())
        left = frozenset(p.name for p in self.outside_images.iterdir())
        if left != self.outside_image_names:
            changes.append(f"outside images lost {sorted(self.outside_image_names - left)}")
        return changes

    def restore_images(self) -> None:
        """Put back fixture images a fuzzed DeleteImage removed (deleting them is legitimate)."""
        self.images.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="fuzzimg") as scratch:
            populate_images(Path(scratch))
            for entry in Path(scratch).iterdir():
                if not (self.images / entry.name).exists():
                    shutil.move(str(entry), self.images / entry.name)
        link = self.images / LINKED_IMAGE
        if not link.is_symlink():
            link.symlink_to(self.outside_images / "dstack-0.5.3", target_is_directory=True)

    def reset_vms(self, client: httpx.Client) -> None:
        """Remove every VM but the stopped fixture, and (re)create that one if it is gone."""
        vms = _rpc(client, "Status", {})["vms"]
        keep = {vm["id"] for vm in vms if vm["id"] == self.stopped_vm and vm["status"] != "running"}
        for vm in vms:
            if vm["id"] not in keep and vm["status"] != "removing":
                client.post("/prpc/RemoveVm?json", json={"id": vm["id"]})
        deadline = time.monotonic() + SETTLE_TIMEOUT
        while _rpc(client, "Status", {})["total"] > len(keep):
            if time.monotonic() > deadline:
                raise TimeoutError(f"fuzzed VMs not removed after {SETTLE_TIMEOUT}s")
            time.sleep(0.1)
        if not keep:
            self.stopped_vm = _rpc(client, "CreateVm", {
                "name": "fuzz-fixture", "image": FAKE_IMAGE, "compose_file": COMPOSE, "vcpu": 1,
                "memory": 64, "disk_size": 1, "stopped": True,
            })["id"]
            # Something for /logs to tail: escapes, a huge line, bytes that are not UTF-8.
            (self.state / "vm" / self.stopped_vm / "serial.log").write_bytes(SERIAL_LOG)

    def prepare(self, client: httpx.Client) -> None:
        """Before a test: fixture images and one stopped VM back, and the sentinel baseline."""
        self.restore_images()
        self.reset_vms(client)
        self.baseline = self.snapshot()

    def log_text(self, offset: int) -> str:
        with self.log_path.open("rb") as fp:
            fp.seek(offset)
            return fp.read().decode(errors="replace")

    def log_size(self) -> int:
        return self.log_path.stat().st_size


def _rpc(client: httpx.Client, method: str, body: Mapping[str, Any]) -> Any:
    response = client.post(f"/prpc/{method}?json", json=body)
    if response.status_code != 200:
        raise AssertionError(f"fixture call {method} failed: {response.status_code} {response.text}")
    return response.json()


@contextmanager
def fuzz_target() -> Iterator[FuzzTarget]:
    """A daemon with a real KMS peer, started inside a planted sentinel tree."""
    with short_dir("vmmfz") as workdir, kms_peer() as kms:
        outside = plant_sentinels(workdir)
        daemon = start_daemon(workdir, extra_config=f'kms_url = "{kms.url}"\n{FUZZ_CONFIG}')
        try:
            yield FuzzTarget(daemon=daemon, workdir=workdir, outside_images=outside,
                             outside_image_names=frozenset(p.name for p in outside.iterdir()))
        finally:
            daemon.destroy()


# --- requests --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    status: int
    headers: httpx.Headers
    body: bytes  # empty when a followed stream was left unread on purpose


class NoAnswer(Exception):
    """The daemon did not answer in time, or dropped the connection."""


def send(
    client: httpx.Client, method: str, raw_path: bytes, *, body: bytes = b"",
    headers: Mapping[str, str] | None = None, leave_stream: bool = False,
) -> Reply:
    """One request with ``raw_path`` sent byte for byte (no re-encoding of the query).

    With ``leave_stream``, a 200 answer's body is not read: a followed log never ends.
    """
    url = client.base_url.copy_with(raw_path=raw_path)
    request = client.build_request(method, url, content=body or None, headers=headers)
    try:
        response = client.send(request, stream=True)
        try:
            if leave_stream and response.status_code == 200:
                return Reply(response.status_code, response.headers, b"")
            data = response.read()
        finally:
            response.close()
    except httpx.TimeoutException as exc:
        raise NoAnswer(f"no answer within the client timeout ({type(exc).__name__})") from None
    except httpx.TransportError as exc:
        raise NoAnswer(f"connection failed: {type(exc).__name__}: {exc}") from None
    return Reply(response.status_code, response.headers, data)


# A logged line starts with its date; a traceback runs until the next one.
_FAILED_RE = re.compile(r"request (\w+) failed: .*?\n(Traceback.*?)(?=\n\d{4}-\d\d-\d\d |\Z)", re.S)


def exception_of(log: str, request_id: str) -> str:
    """The last line of the traceback the daemon logged for ``request_id`` ('' if none)."""
    for match in _FAILED_RE.finditer(log):
        if match.group(1) == request_id:
            lines = [line for line in match.group(2).splitlines() if line.strip()]
            return lines[-1] if lines else ""
    return ""


def unexplained_tracebacks(log: str) -> list[str]:
    """Tracebacks in ``log`` other than those of failed requests (which answered 500 already)."""
    rest = _FAILED_RE.sub("", log)
    found = []
    start = rest.find("Traceback")
    while start >= 0:
        line_start = rest.rfind("\n", 0, max(start - 1, 0)) + 1
        found.append(rest[line_start:start + 1500])
        start = rest.find("Traceback", start + 1)
    return found


def preview(data: bytes | str, limit: int = 300) -> str:
    text = data if isinstance(data, str) else data.decode("utf-8", "backslashreplace")
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"


def record(path: str, finding: Mapping[str, Any]) -> None:
    """Append one finding (JSON line) to the collect-mode report."""
    with Path(path).open("a") as fp:
        fp.write(json.dumps(finding) + "\n")
