"""SvList, SvStop and SvRemove on the real supervisor, with real (idle) QEMU processes."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.daemon_proc import DaemonProcess
from tests.support.short_dirs import short_dir
from tests.support.vm_ops import create, idle_daemon, rpc, status_of, wait_for
from vmm.rpc import prpc_pb2
from vmm.rpc import vmm_rpc_pb2 as pb


@pytest.fixture
def daemon() -> Iterator[DaemonProcess]:
    with short_dir("vmmsv") as workdir, idle_daemon(workdir) as proc:
        yield proc


def test_sv_list_stop_remove(daemon: DaemonProcess) -> None:
    """The supervisor's table is listed; stop and remove act on it and refuse what they must."""
    with daemon.client() as client:
        vm_id = create(client)
        wait_for("QEMU to run", lambda: status_of(client, vm_id) == "running")
        processes = {p["id"]: p for p in rpc(client, "SvList")["processes"]}
        assert processes[vm_id]["status"] == "running"
        assert processes[vm_id]["pid"] > 0
        assert "qemu-system-x86_64" in processes[vm_id]["command"]
        assert '"kind": "cvm"' in processes[vm_id]["note"]

        refused = client.post("/prpc/SvRemove?json", json={"id": vm_id})
        assert refused.status_code == 409

        assert rpc(client, "SvStop", {"id": vm_id}) is None
        assert status_of(client, vm_id) == "stopped"
        (process,) = [p for p in rpc(client, "SvList")["processes"] if p["id"] == vm_id]
        assert process["status"] == "stopped"

        assert rpc(client, "SvRemove", {"id": vm_id}) is None
        assert [p for p in rpc(client, "SvList")["processes"] if p["id"] == vm_id] == []
        for method in ("SvStop", "SvRemove"):
            missing = client.post(f"/prpc/{method}?json", json={"id": vm_id})
            assert missing.status_code == 404
            assert "Supervisor process not found" in missing.json()["error"]
        # The VM itself is still defined and can start again (a new supervisor entry).
        rpc(client, "StartVm", {"id": vm_id})
        wait_for("QEMU to run again", lambda: status_of(client, vm_id) == "running")


def test_sv_stop_and_remove_refuse_ids_that_are_not_names(daemon: DaemonProcess) -> None:
    """SvStop/SvRemove with '..', '.', a slash or a newline are 400 naming `id`, in JSON and protobuf."""
    with daemon.client() as client:
        for method in ("SvStop", "SvRemove"):
            for bad in ("..", ".", "../supervisor", "a\nb", "a b", "x" * 65):
                response = client.post(f"/prpc/{method}?json", json={"id": bad})
                assert response.status_code == 400, (method, bad, response.text)
                assert "invalid field `id`" in response.json()["error"], (method, bad)
                response = client.post(
                    f"/prpc/{method}", content=pb.Id(id=bad).SerializeToString(),
                    headers={"Content-Type": "application/octet-stream"},
                )
                assert response.status_code == 400, (method, bad)
                assert "`id`" in prpc_pb2.PrpcError.FromString(response.content).message
        # The supervisor was never asked, and still answers.
        assert rpc(client, "SvList") == {"processes": []}
