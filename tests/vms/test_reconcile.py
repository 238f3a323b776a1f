"""Reconciliation (daemon start and ReloadVms), crashes at random points, concurrent callers."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.daemon_proc import DaemonProcess, start_daemon
from tests.support.idle_image import IDLE_IMAGE
from tests.support.short_dirs import short_dir
from tests.support.vm_ops import (
    FAKE_IMAGE,
    call,
    compose,
    create,
    idle_config,
    idle_daemon,
    pid_gone,
    prepare_images,
    qemu_pid_of,
    qemu_pids,
    rpc,
    status_of,
    supervisor_processes,
    vm_info,
    wait_for,
)
from vmm.model.manifest import DesiredState, Manifest
from vmm.vms.update import JOURNAL

pytestmark = pytest.mark.qemu

NO_AUTO_RESTART = "[cvm.auto_restart]\nenabled = false\n"


def edit_manifest(vm_dir: Path, **changes: Any) -> None:
    path = vm_dir / "vm-manifest.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


def clone(run: Path, source: str, new_id: str) -> None:
    shutil.copytree(run / source, run / new_id, ignore=shutil.ignore_patterns("qemu.pid", "*.sock"))
    edit_manifest(run / new_id, id=new_id)


def vanish(vm_dir: Path, workdir: Path) -> None:
    """Make a VM directory disappear at once, as ``rm -rf`` would appear to the daemon.

    Its QEMU is still running and may write into it, so an rmtree in place can race a new file
    ("Directory not empty"); a rename out of the state directory is atomic.
    """
    vm_dir.rename(workdir / f"vanished-{vm_dir.name}")


def cid_of(state: Path, vm_id: str) -> int:
    cid: int = supervisor_processes(state)[vm_id]["config"]["cid"]
    return cid


def test_reload_counts_and_applies_disk_changes() -> None:
    """ReloadVms loads new dirs, re-reads edited ones, forgets vanished ones (stopping QEMU)."""
    with short_dir("vmmc") as workdir, idle_daemon(workdir, extra=NO_AUTO_RESTART) as daemon, \
            daemon.client() as client:
        run = workdir / "state" / "vm"
        edited = create(client, FAKE_IMAGE, stopped=True)
        doomed = create(client)  # running
        template = create(client, stopped=True)
        doomed_pid = wait_for("QEMU", lambda: qemu_pid_of(run / doomed))
        assert rpc(client, "ReloadVms") == {"loaded": 0, "updated": 0, "removed": 0}

        edit_manifest(run / edited, name="renamed-on-disk")
        clone(run, template, "dropped-in")
        (run / "dropped-in" / "vm-state.json").write_bytes(DesiredState(started=True).dumps())
        vanish(run / doomed, workdir)
        (run / "not a vm!").mkdir()
        assert rpc(client, "ReloadVms") == {"loaded": 1, "updated": 1, "removed": 1}

        assert vm_info(client, edited)["name"] == "renamed-on-disk"
        assert ("vmm.reloaded", "configuration re-read from disk") in [
            (e["event"], e["body"]) for e in vm_info(client, edited)["events"]]
        assert status_of(client, doomed) == "gone"
        wait_for("the vanished VM's QEMU to stop", lambda: pid_gone(doomed_pid))
        assert doomed not in supervisor_processes(workdir / "state")
        # The dropped-in VM says it should run: reconciliation starts it.
        wait_for("the dropped-in VM to run",
                 lambda: status_of(client, "dropped-in") == "running")
        assert qemu_pid_of(run / "dropped-in")
        assert (run / "not a vm!").is_dir()
        assert "leaving " + str(run / "not a vm!") + " untouched" in daemon.log()
        assert rpc(client, "ReloadVms") == {"loaded": 0, "updated": 0, "removed": 0}


def test_restart_keeps_cids_resumes_and_reports_orphans() -> None:
    """After kill -9: running VMs keep their CIDs, desired state is applied, orphans are left."""
    with short_dir("vmmc") as workdir:
        prepare_images(workdir)
        config = idle_config(extra=NO_AUTO_RESTART)
        state, run = workdir / "state", workdir / "state" / "vm"
        first = start_daemon(workdir, extra_config=config)
        second: DaemonProcess | None = None
        try:
            with first.client() as client:
                keeper = create(client)        # CID 1000, the lowest
                crashed = create(client)       # its QEMU dies while the daemon is down
                orphan = create(client)        # its directory vanishes while the daemon is down
                doomed = create(client, stopped=True)  # marked .removing while down
                template = create(client, stopped=True)
                for vm_id in (keeper, crashed, orphan):
                    wait_for("QEMU", partial(qemu_pid_of, run / vm_id))
            cids = {vm_id: cid_of(state, vm_id) for vm_id in (keeper, crashed, orphan)}
            assert cids[keeper] == 1000
            keeper_pid, orphan_pid = qemu_pid_of(run / keeper), qemu_pid_of(run / orphan)
            crashed_pid = qemu_pid_of(run / crashed)
            assert keeper_pid and orphan_pid and crashed_pid
            first.kill()

            os.kill(crashed_pid, signal.SIGKILL)
            wait_for("the crashed QEMU to die", lambda: pid_gone(crashed_pid))
            vanish(run / orphan, workdir)
            (run / doomed / ".removing").touch()
            # Sorts before every UUID, so it is loaded first and would grab the lowest free CID.
            clone(run, template, "-first-in-line")
            (run / ".creating-leftover").mkdir()

            second = start_daemon(workdir, extra_config=config)
            with second.client() as client:
                assert status_of(client, keeper) == "running"
                assert qemu_pid_of(run / keeper) == keeper_pid
                wait_for("the crashed VM to run again",
                         lambda: qemu_pid_of(run / crashed) not in (None, crashed_pid))
                wait_for("the interrupted removal", lambda: status_of(client, doomed) == "gone")
                assert not (run / doomed).exists()
                assert not (run / ".creating-leftover").exists()
                log = second.log()
                assert f"orphan: the backend runs {orphan}" in log
                assert not pid_gone(orphan_pid)  # reported, never stopped
                assert status_of(client, orphan) == "gone"

                # No CID is handed out twice: the dropped-in VM and a new one get fresh CIDs.
                rpc(client, "StartVm", {"id": "-first-in-line"})
                fresh = create(client)
                taken = {cid_of(state, v) for v in (keeper, crashed, "-first-in-line", fresh)}
                assert cid_of(state, keeper) == cids[keeper]
                assert len(taken) == 4 and cids[orphan] not in taken
                assert rpc(client, "ReloadVms") == {"loaded": 0, "updated": 0, "removed": 0}
                assert cid_of(state, keeper) == cids[keeper]
                assert "orphan" in second.log()[len(log):]
        finally:
            if second is not None:
                second.destroy()
            first.destroy()


# -- kill -9 at random points -----------------------------------------------------------------


def kms_url(tag: str) -> str:
    return f"http://kms-{tag}.test:8000"


def tag_of(compose_text: str) -> str:
    name: str = json.loads(compose_text)["name"]
    return name.removeprefix("demo-")


@dataclass
class Ledger:
    """What the API confirmed before each kill: such changes must survive it."""

    created: set[str]
    removed: set[str]
    remove_sent: set[str]  # the daemon may have died before answering: either outcome is fine


def churn(client: httpx.Client, rng: random.Random, ledger: Ledger, known: list[str],
          run_vms: bool, stop: threading.Event) -> None:
    """CreateVm, UpdateVm and RemoveVm in a loop until ``stop`` (or the daemon dies)."""
    counter = 0
    while not stop.is_set():
        counter += 1
        tag = f"{rng.randrange(1 << 30):x}"
        choice = rng.random()
        try:
            if choice < 0.45 or not known:
                running = run_vms and rng.random() < 0.5
                body = {"name": "churn", "image": IDLE_IMAGE if running else FAKE_IMAGE,
                        "compose_file": compose(tag), "kms_urls": [kms_url(tag)], "vcpu": 1,
                        "memory": 64, "disk_size": 1, "stopped": not running}
                response = call(client, "CreateVm", body)
                if response.status_code == 200:
                    vm_id = response.json()["id"]
                    ledger.created.add(vm_id)
                    known.append(vm_id)
            elif choice < 0.75:
                vm_id = rng.choice(known)
                call(client, "UpdateVm", {"id": vm_id, "compose_file": compose(tag),
                                          "update_kms_urls": True, "kms_urls": [kms_url(tag)]})
            else:
                vm_id = rng.choice(known)
                ledger.remove_sent.add(vm_id)
                if call(client, "RemoveVm", {"id": vm_id}).status_code == 200:
                    ledger.removed.add(vm_id)
                    known.remove(vm_id)
        except httpx.HTTPError:
            return  # the daemon was killed mid-call: exactly the point


def check_consistent(daemon: DaemonProcess, ledger: Ledger) -> list[str]:
    """Assert the invariants a crash must not break; return the VMs that exist."""
    state = daemon.workdir / "state"
    run = state / "vm"
    with daemon.client() as client:
        wait_for("interrupted removals to finish", lambda: not any(
            vm["status"] == "removing" for vm in rpc(client, "Status")["vms"]), timeout=60)
        # VMs that should run are started in the background at load.
        wait_for("VMs that should run to run", lambda: all(
            vm["status"] in ("running", "stopped")
            for vm in rpc(client, "Status", {"brief": True})["vms"]), timeout=60)
        listed = {vm["id"]: vm for vm in rpc(client, "Status", {"brief": True})["vms"]}
    names = {p.name for p in run.iterdir()} if run.exists() else set()
    assert not [n for n in names if n.startswith(".")], names  # no staging, no temp files
    assert set(listed) == names, (set(listed) ^ names)  # nothing half-present, nothing lost
    assert ledger.created - ledger.remove_sent <= names, "a confirmed create was lost"
    assert not ledger.removed & names, "a confirmed removal was not completed"
    for vm_id in names:
        manifest = Manifest.loads((run / vm_id / "vm-manifest.json").read_bytes())
        desired = DesiredState.loads((run / vm_id / "vm-state.json").read_bytes())
        assert manifest.id == vm_id
        assert not (run / vm_id / JOURNAL).exists()
        # An update is all or nothing: compose and manifest always come from the same call.
        text = (run / vm_id / "shared" / "app-compose.json").read_text()
        assert list(manifest.kms_urls) == [kms_url(tag_of(text))], vm_id
        assert listed[vm_id]["status"] == ("running" if desired.started else "stopped")
    # No QEMU without a VM, and exactly one for each running VM.
    expected = sorted(pid for vm_id, vm in listed.items() if vm["status"] == "running"
                      for pid in [qemu_pid_of(run / vm_id)] if pid is not None)
    assert qemu_pids(state) == expected
    assert len(expected) == sum(vm["status"] == "running" for vm in listed.values())
    return sorted(names)


def test_kill_during_create_update_remove_leaves_consistent_state() -> None:
    """kill -9 at random points of CreateVm/UpdateVm/RemoveVm, 32 times: every restart is clean."""
    seed = int(os.environ.get("VMM_TEST_SEED", time.time()))
    rng = random.Random(seed)
    print(f"seed {seed}")
    ledger = Ledger(created=set(), removed=set(), remove_sent=set())
    with short_dir("vmmk") as workdir:
        prepare_images(workdir)
        config = idle_config(cvm="max_allocable_vcpu = 1000\n", extra=NO_AUTO_RESTART)
        daemon: DaemonProcess | None = None
        try:
            for iteration in range(32):
                daemon = start_daemon(workdir, extra_config=config)
                known = check_consistent(daemon, ledger)
                # A few rounds run real (idle) QEMUs; the rest stay cheap with stopped VMs.
                run_vms = iteration % 6 == 5 and len(qemu_pids(workdir / "state")) < 4
                stop = threading.Event()
                with daemon.client() as client:
                    worker = threading.Thread(target=churn, args=(
                        client, rng, ledger, known, run_vms, stop))
                    worker.start()
                    time.sleep(rng.uniform(0.02, 0.4))
                    daemon.kill()  # SIGKILL: the supervisor and QEMUs live on
                    stop.set()
                    worker.join(timeout=60)
                    assert not worker.is_alive()
            daemon = start_daemon(workdir, extra_config=config)
            check_consistent(daemon, ledger)
            print(f"created {len(ledger.created)}, removed {len(ledger.removed)}, "
                  f"removals in flight at a kill {len(ledger.remove_sent - ledger.removed)}")
            assert len(ledger.created) >= 32 and ledger.removed
        finally:
            if daemon is not None:
                daemon.destroy()


# -- concurrency ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Record:
    began: float
    ended: float
    vm_id: str
    op: str
    arg: str
    status: int


def allowed_outcomes(records: list[Record], ops: set[str]) -> dict[str, set[str]]:
    """Per VM, the calls that may have been applied last: the last to finish and any overlapping it."""
    outcome: dict[str, set[str]] = {}
    by_vm: dict[str, list[Record]] = {}
    for record in records:
        if record.op in ops:
            by_vm.setdefault(record.vm_id, []).append(record)
    for vm_id, mine in by_vm.items():
        last = max(mine, key=lambda r: r.ended)
        outcome[vm_id] = {r.arg for r in mine if r.ended >= last.began}
    return outcome


def test_concurrent_lifecycle_calls_end_consistent() -> None:
    """125 start/stop/update/status calls on 10 VMs from 5 clients: no 500, state = last call."""
    with short_dir("vmmn") as workdir, idle_daemon(workdir, extra=NO_AUTO_RESTART) as daemon:
        state, run = workdir / "state", workdir / "state" / "vm"
        with daemon.client() as client:
            vm_ids = [create(client, stopped=True, compose_file=compose("0")) for _ in range(10)]
        records: list[Record] = []
        lock = threading.Lock()

        def client_thread(seed: int) -> None:
            rng = random.Random(seed)
            with daemon.client() as client:
                for n in range(25):
                    vm_id = rng.choice(vm_ids)
                    op = rng.choice(["StartVm", "StopVm", "StartVm", "StopVm", "UpdateVm", "Status"])
                    body: dict[str, Any] = {"id": vm_id}
                    arg = {"StartVm": "running", "StopVm": "stopped"}.get(op, "")
                    if op == "UpdateVm":
                        arg = compose(f"{seed}-{n}")
                        body["compose_file"] = arg
                    elif op == "Status":
                        body = {"ids": [vm_id]}
                    began = time.monotonic()
                    status = call(client, op, body).status_code
                    with lock:
                        records.append(Record(began, time.monotonic(), vm_id, op, arg, status))

        threads = [threading.Thread(target=client_thread, args=(seed,)) for seed in range(5)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=240)
        assert not any(thread.is_alive() for thread in threads)
        assert len(records) == 125
        assert {r.status for r in records} == {200}, [r for r in records if r.status != 200]

        power = allowed_outcomes(records, {"StartVm", "StopVm"})
        composes = allowed_outcomes(records, {"UpdateVm"})
        with daemon.client() as client:
            for vm_id in vm_ids:
                info = vm_info(client, vm_id)
                status = info["status"]
                assert status in power.get(vm_id, {"stopped"}), (vm_id, status, power.get(vm_id))
                desired = DesiredState.loads((run / vm_id / "vm-state.json").read_bytes())
                assert desired.started == (status == "running")
                on_disk = (run / vm_id / "shared" / "app-compose.json").read_text()
                assert on_disk == info["configuration"]["compose_file"]
                assert on_disk in composes.get(vm_id, {compose("0")})
                assert (qemu_pid_of(run / vm_id) is not None) == (status == "running")
            running = [v for v in vm_ids if status_of(client, v) == "running"]
        assert qemu_pids(state) == sorted(
            pid for v in running for pid in [qemu_pid_of(run / v)] if pid is not None)
