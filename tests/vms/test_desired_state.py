"""The desired state recorded by several callers at once ends the same on disk and in memory."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from tests.support.in_process import in_process_config, state_dir
from vmm.backend.qemu.backend import QemuBackend
from vmm.host.capabilities import detect
from vmm.model.manifest import DesiredState
from vmm.rpc import vmm_rpc_pb2 as pb
from vmm.supervisor.client import ensure_supervisor
from vmm.vms.manager import Manager

COMPOSE = json.dumps({"runner": "docker-compose"})


def test_concurrent_records_of_started_agree_with_vm_state_json() -> None:
    """ShutdownVm and a guest's power-off notice (and more) at once: no error; memory = disk."""
    async def scenario(state: Path) -> None:
        config = in_process_config(state)
        supervisor = await ensure_supervisor(
            Path(config.supervisor.sock), Path(config.supervisor.pid_file),
            Path(config.supervisor.log_file), state_file=Path(config.supervisor.state_file),
        )
        manager = Manager(config, detect(config.cvm), QemuBackend(config, supervisor))
        try:
            vm = manager.get(await manager.create(pb.VmConfiguration(
                name="desired", image="dstack-dev-0.5.4", compose_file=COMPOSE, vcpu=1,
                memory=256, disk_size=1, stopped=True,
            )))
            for round_ in range(30):
                flags = [(round_ + n) % 3 == 0 for n in range(6)]
                await asyncio.gather(*(manager.set_desired(vm, flag) for flag in flags))
                on_disk = DesiredState.loads(vm.workdir.state.read_bytes()).started
                assert on_disk == vm.started == flags[-1], round_
        finally:
            await manager.close()
            await supervisor.aclose()

    with state_dir("ds") as state:
        asyncio.run(scenario(state))
