"""The daemon object: the parts that live as long as the process, built once from the config.

The composition root: host facts, peers and auth in ``__init__``; ``start`` opens the backend
that ``[cvm] backend`` names (``backend.select``), builds the Manager over it and loads the VMs.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
from functools import partial
from pathlib import Path

from vmm.api.auth import Authenticator
from vmm.api.server import bind_vsock, serve_quietly
from vmm.backend.base import VmBackend
from vmm.backend.select import open_backend
from vmm.core.config import Config, parse_registry, parse_vsock_address
from vmm.core.exceptions import ConfigError
from vmm.guest.host_api import host_api_app
from vmm.host.capabilities import HostCapabilities, HostProbe, detect
from vmm.peers.kms import KmsClient
from vmm.peers.registry import RegistryClient
from vmm.vms.events import EventBus
from vmm.vms.image_pull import ImagePulls, PullProgress
from vmm.vms.limits import ResourceUsage, usage
from vmm.vms.manager import Manager

log = logging.getLogger(__name__)

# <run_path>/<36-char uuid>/host-api.sock must fit in AF_UNIX's 108 bytes.
_LONGEST_VM_SOCKET = len("/12345678-1234-1234-1234-123456789abc/host-api.sock")
_UNIX_PATH_MAX = 107


class Daemon:
    def __init__(self, config: Config, probe: HostProbe | None = None, *,
                 config_file: str = "") -> None:
        self.config = config
        self.config_file = config_file  # where config came from ("" = embedded defaults)
        self.host: HostCapabilities = detect(config.cvm, probe)
        self.kms = KmsClient(config.kms_url)
        self.authenticator = Authenticator.from_config(config.auth)
        run_path = Path(config.run_path).absolute()
        if len(str(run_path)) + _LONGEST_VM_SOCKET > _UNIX_PATH_MAX:
            raise ConfigError(
                f"`run_path`: {run_path} is too long for the VMs' Unix sockets "
                f"(at most {_UNIX_PATH_MAX - _LONGEST_VM_SOCKET} characters)"
            )
        self.image_pulls = ImagePulls(Path(config.image.path), _registry_client(config))
        self._manager: Manager | None = None
        self._backend: VmBackend | None = None
        self._host_api_task: asyncio.Task[None] | None = None

    @property
    def backend(self) -> VmBackend:
        if self._backend is None:
            raise RuntimeError("the daemon has not started")
        return self._backend

    @property
    def manager(self) -> Manager:
        if self._manager is None:
            raise RuntimeError("the daemon has not started")
        return self._manager

    async def start(self) -> None:
        log.info(
            "host: accel=%s tee=%s guest channel=%s cpu=%s qemu=%s %s",
            self.host.accel, self.host.tee, self.host.channel, self.host.cpu_model,
            self.host.qemu_path or "(not found)", self.host.qemu_version,
        )
        self.image_pulls.clean_staging()
        self._backend = await open_backend(self.config, self.host)
        log.info("backend: %s", self._backend.info.name)
        self._manager = Manager(self.config, self.host, self._backend)
        self.image_pulls.on_progress = partial(_publish_pull, self._manager.events)
        await self._manager.load_all()
        self._manager.start_watching()
        if self.host.channel == "vsock":
            self._serve_host_api_on_vsock(self._manager)

    def _serve_host_api_on_vsock(self, manager: Manager) -> None:
        api = self.config.host_api
        sock = bind_vsock(parse_vsock_address(api.address), api.port)
        app = host_api_app(manager.channels.bridge, manager.channels.vm_for_cid,
                           self.config.max_request_body)
        self._host_api_task = asyncio.create_task(serve_quietly(app, [sock], self.config.server))
        log.info("host API on vsock:%s port %d", api.address, api.port)

    async def stop(self) -> None:
        # VMs keep running: they belong to the backend, which outlives us on purpose.
        if self._host_api_task is not None:
            self._host_api_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._host_api_task
        await self.image_pulls.close()
        if self.image_pulls.client is not None:
            self.image_pulls.client.close()
        if self._manager is not None:
            await self._manager.close()
        if self._backend is not None:
            await self._backend.close()
        await self.kms.aclose()

    def resource_usage(self) -> ResourceUsage:
        """What the VMs reserve, by the rule CreateVm/StartVm/ResizeVm enforce (``limits``)."""
        if self._manager is None:
            return ResourceUsage(0, 0, 0)
        return usage(self._manager.vms.values())


def _registry_client(config: Config) -> RegistryClient | None:
    image = config.image
    if not image.registry:
        return None
    return RegistryClient(parse_registry(image.registry), ca_file=image.registry_ca_file,
                          plain_http=image.registry_plain_http)


def _publish_pull(bus: EventBus, progress: PullProgress) -> None:
    """An image pull's progress on the event bus (so on /events): it belongs to no VM."""
    bus.publish("", "vmm.image_pull", json.dumps(dataclasses.asdict(progress)),
                status=progress.status)
