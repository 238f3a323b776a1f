"""The daemon object: the parts that live as long as the process, built once from the config."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from vmm.auth import Authenticator
from vmm.config import Config
from vmm.host import HostCapabilities, HostProbe, detect
from vmm.kms import KmsClient

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResourceUsage:
    vms: int
    vcpu: int
    memory_mb: int


class Daemon:
    def __init__(self, config: Config, probe: HostProbe | None = None) -> None:
        self.config = config
        self.host: HostCapabilities = detect(config.cvm, probe)
        self.kms = KmsClient(config.kms_url)
        self.authenticator = Authenticator.from_config(config.auth)

    async def start(self) -> None:
        log.info(
            "host: accel=%s tee=%s guest channel=%s cpu=%s qemu=%s %s",
            self.host.accel,
            self.host.tee,
            self.host.channel,
            self.host.cpu_model,
            self.host.qemu_path or "(not found)",
            self.host.qemu_version,
        )

    async def stop(self) -> None:
        await self.kms.aclose()

    def resource_usage(self) -> ResourceUsage:
        return ResourceUsage(vms=0, vcpu=0, memory_mb=0)
