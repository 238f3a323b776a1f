"""The watcher's refresh never undoes a start or stop that finished while it asked the backend.

An in-memory backend (a policy test: the same race is exercised on real QEMU by
tests/vms/test_reconcile.py::test_concurrent_lifecycle_calls_end_consistent) holds its listing
until the test has recorded a start, so the interleaving is certain rather than timed.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path
from typing import cast

from vmm.backend.base import VmBackend
from vmm.core.config import Config
from vmm.host.capabilities import detect
from vmm.model.manifest import Manifest
from vmm.model.runtime import Runtime
from vmm.model.vm import Vm
from vmm.model.workdir import SharedFiles, Workdir
from vmm.vms.manager import Manager


class HeldListing:
    """Only what refresh uses: ``runtimes``, whose answer is taken at once but held back."""

    def __init__(self) -> None:
        self.listing: dict[str, Runtime] = {}
        self.release = asyncio.Event()

    async def runtimes(self) -> dict[str, Runtime]:
        snapshot = dict(self.listing)
        await self.release.wait()
        return snapshot


def test_a_start_during_the_listing_is_kept_and_the_next_round_reads_it(tmp_path: Path) -> None:
    """A runtime recorded while the listing was taken survives it; the next round applies."""

    async def scenario() -> None:
        config = replace(Config(), run_path=str(tmp_path / "vm"))
        backend = HeldListing()
        manager = Manager(config, detect(config.cvm), cast(VmBackend, backend))
        manifest = Manifest(id="vm-1", name="a", app_id="ab" * 20, image="img", vcpu=1,
                            memory=64, disk_size=1, created_at_ms=1)
        vm = Vm(workdir=Workdir(tmp_path / "vm" / "vm-1"), manifest=manifest,
                shared=SharedFiles(compose="{}"), started=True, cid=3)
        manager.vms[vm.id] = vm

        refreshing = asyncio.create_task(manager.refresh())
        await asyncio.sleep(0)  # the listing (nothing runs) is taken and held
        vm.runtime = Runtime(status="running", pid=4242)  # a StartVm ends meanwhile
        backend.release.set()
        await refreshing
        assert vm.running and vm.runtime is not None and vm.runtime.pid == 4242

        backend.listing = {vm.id: Runtime(status="exited", exit_code=1)}
        await manager.refresh()  # unchanged since it asked: the listing applies
        assert not vm.running and vm.status == "exited"

    asyncio.run(scenario())
