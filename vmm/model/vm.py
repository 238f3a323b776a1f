"""One VM as the daemon holds it in memory, and how it is reported (``VmInfo``).

Everything Status reports comes from here, never from disk: the manifest and shared files are
cached when they are written or loaded, and the runtime state is refreshed from the backend by
the manager's watcher. The desired state (``started``) is also on disk in vm-state.json. A Vm
holds no channels and no processes: the guest hub and the backend keep those, by VM id.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Literal

from vmm.model.manifest import Manifest
from vmm.model.runtime import Runtime
from vmm.model.workdir import SharedFiles, Workdir
from vmm.rpc import vmm_rpc_pb2 as pb

VmStatus = Literal["running", "paused", "exited", "stopping", "stopped", "removing"]


class _Versions:
    """One counter for all VMs, so a version is never reused.

    Not even by a VM re-created under the same id; ``last`` tells whether any VM changed at all.
    """

    last = 0

    @classmethod
    def next(cls) -> int:
        cls.last += 1
        return cls.last


def last_version() -> int:
    """The newest version any VM took: unchanged means no VM changed (nor was created)."""
    return _Versions.last


# Fields whose change does not change what the VM reports (``info``): setting them keeps the
# version, so a cached encoding of the VM stays valid.
_UNREPORTED = frozenset({"version", "lock", "desired_lock", "background", "disk_stamp", "on_event",
                         "launched_at"})
_UNSET = object()


@dataclass
class Vm:
    workdir: Workdir
    manifest: Manifest
    shared: SharedFiles
    started: bool  # the desired state, as in vm-state.json
    cid: int
    image_version: str = ""
    removing: bool = False
    runtime: Runtime | None = None
    boot_progress: str = ""
    boot_error: str = ""
    shutdown_progress: str = ""
    instance_id: str = ""
    events: deque[pb.GuestEvent] = field(default_factory=lambda: deque(maxlen=20))
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # Orders the records of ``started`` (disk, then memory): taken by callers that may or may
    # not hold ``lock`` (an RPC holds it, a guest's power-off notice does not).
    desired_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    background: set[asyncio.Task[None]] = field(default_factory=set)
    app_url: str = ""
    # Where the VM's events go besides its ring: the daemon's event bus (vms/events), handed
    # in by the manager so this layer needs no import of it.
    on_event: Callable[[Vm, pb.GuestEvent], None] | None = None
    launched_at: float | None = None  # monotonic time of this boot's launch, until boot is done
    # Bumped by every assignment to a reported field and by ``add_event``, whoever makes it
    # (an RPC, the watcher, a guest notification, a reload): caches of the VM's encoded
    # ``VmInfo`` compare it, so no writer can forget to invalidate them.
    version: int = field(default=0, compare=False)
    # What the VM's files looked like (stat) when last read by a reload: an equal stamp means
    # nothing to re-read (see ``vms.reconcile``). None: never stamped, read them.
    disk_stamp: tuple[object, ...] | None = field(default=None, compare=False)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _UNREPORTED:
            object.__setattr__(self, name, value)
            return
        old = self.__dict__.get(name, _UNSET)
        object.__setattr__(self, name, value)
        # The watcher assigns every VM's runtime each second, mostly an equal one: that keeps
        # the version (and the caches), as any assignment that changes nothing does.
        if old is not value and not (type(old) is type(value) and old == value):
            object.__setattr__(self, "version", _Versions.next())

    @property
    def id(self) -> str:
        return self.manifest.id

    @property
    def running(self) -> bool:
        return self.runtime is not None and self.runtime.running

    @property
    def paused(self) -> bool:
        """Running with its vCPUs stopped (PauseVm); as the backend reports it."""
        return self.runtime is not None and self.runtime.running and self.runtime.paused

    @property
    def status(self) -> VmStatus:
        if self.removing:
            return "removing"
        if self.started:
            if self.paused:
                return "paused"
            return "running" if self.running else "exited"
        return "stopping" if self.running else "stopped"

    def add_event(self, event: str, body: str = "") -> None:
        item = pb.GuestEvent(event=event, body=body, timestamp=int(time.time() * 1000))
        self.events.append(item)
        self.version = _Versions.next()
        if self.on_event is not None:
            self.on_event(self, item)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run a background job tied to this VM; keep a reference so it is not collected."""
        task = asyncio.create_task(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)
        return task

    def clock(self, now: float) -> tuple[str, str]:
        """(uptime, exited_at) as reported at ``now``: the only parts of ``info`` that age."""
        state = self.runtime
        if state is None:
            return "", ""
        running = state.running
        uptime = humantime(now - state.started_at) if state.started_at and running else ""
        exited = humantime(now - state.stopped_at) if state.stopped_at and not running else ""
        return uptime, exited

    def clock_valid_until(self, now: float) -> float:
        """When ``clock`` next changes (its strings count whole seconds); inf if never."""
        state = self.runtime
        if state is None:
            return math.inf
        since = state.started_at if state.running else state.stopped_at
        if not since:
            return math.inf
        return since + max(math.floor(now - since), 0) + 1

    def info(self, *, brief: bool, guest_channel: str = "", now: float | None = None) -> pb.VmInfo:
        uptime, exited = self.clock(time.time() if now is None else now)
        info = pb.VmInfo(
            id=self.id,
            name=self.manifest.name,
            status=self.status,
            uptime=uptime,
            app_id=self.manifest.app_id,
            boot_progress=self.boot_progress,
            boot_error=self.boot_error,
            shutdown_progress=self.shutdown_progress,
            image_version=self.image_version,
            events=list(self.events),
            guest_channel=guest_channel,
        )
        if exited:
            info.exited_at = exited
        if self.instance_id:
            info.instance_id = self.instance_id
        if self.app_url:
            info.app_url = self.app_url
        if not brief:
            info.configuration.CopyFrom(self.configuration())
        return info

    def configuration(self) -> pb.VmConfiguration:
        m = self.manifest
        config = pb.VmConfiguration(
            name=m.name,
            image=m.image,
            compose_file=self.shared.compose,
            vcpu=m.vcpu,
            memory=m.memory,
            disk_size=m.disk_size,
            ports=[
                pb.PortMapping(protocol=p.protocol, host_port=p.host_port, vm_port=p.vm_port,
                               host_address=p.address, nic=p.nic)
                for p in m.port_map
            ],
            encrypted_env=self.shared.encrypted_env,
            app_id=m.app_id,
            user_config=self.shared.user_config,
            hugepages=m.hugepages,
            pin_numa=m.pin_numa,
            kms_urls=m.kms_urls,
            gateway_urls=m.gateway_urls,
            stopped=not self.started,
            no_tee=m.no_tee,
            networks=[pb.NetworkingConfig(mode=n.mode, bridge_name=n.bridge, mac=n.mac)
                      for n in m.networks],
        )
        if m.networks:
            config.networking.CopyFrom(config.networks[0])
        if m.gpus is not None:
            config.gpus.CopyFrom(
                pb.GpuConfig(attach_mode=m.gpus.attach_mode,
                             gpus=[pb.GpuSpec(slot=g.slot) for g in m.gpus.gpus])
            )
        return config


def humantime(seconds: float) -> str:
    """``1h 2m 3s``-style duration, truncated to whole seconds (``0s`` at least)."""
    remaining = max(int(seconds), 0)
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if remaining >= size:
            parts.append(f"{remaining // size}{unit}")
            remaining %= size
    if remaining or not parts:
        parts.append(f"{remaining}s")
    return " ".join(parts)
