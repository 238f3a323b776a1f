"""The native gRPC listener: the Vmm service through a client generated from proto/, with the
same auth and error codes as /prpc, ended cleanly by SIGTERM."""

from __future__ import annotations

import importlib
import json
import pkgutil
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import httpx
import pytest
from google.protobuf.empty_pb2 import Empty

from tests.support.daemon_proc import DaemonProcess, start_daemon
from tests.support.idle_image import IDLE_IMAGE
from tests.support.kms_peer import KmsPeer, expected_answer
from tests.support.short_dirs import short_dir
from tests.support.vm_ops import COMPOSE, compose, free_port, prepare_images, wait_for
from vmm.api.grpc_server import STATUS_OF_CODE, grpc_status, grpc_target
from vmm.core import exceptions
from vmm.rpc import vmm_rpc_pb2 as pb
from vmm.rpc.vmm_rpc_pb2_grpc import VmmStub

TOKEN = "grpc-test-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)


@pytest.fixture(scope="module")
def grpc_daemon(kms: KmsPeer) -> Iterator[tuple[DaemonProcess, int]]:
    with short_dir("vmgr") as workdir:
        prepare_images(workdir)
        port = free_port()
        config = (f'kms_url = "{kms.url}"\ngrpc_address = "tcp:127.0.0.1:{port}"\n'
                  f'[cvm]\naccel = "tcg"\n[auth]\nenabled = true\ntokens = ["{TOKEN}"]\n')
        daemon = start_daemon(workdir, extra_config=config)
        try:
            yield daemon, port
        finally:
            daemon.destroy()


@pytest.fixture
def stub(grpc_daemon: tuple[DaemonProcess, int]) -> Iterator[Any]:
    with grpc.insecure_channel(f"127.0.0.1:{grpc_daemon[1]}") as channel:
        yield make_stub(channel)


@dataclass(frozen=True)
class Failure:
    code: grpc.StatusCode
    details: str
    vmm_code: str  # the trailing metadata's vmm-code


def failure(call: Callable[[], object]) -> Failure:
    """How a call failed (the test fails if it succeeded)."""
    with pytest.raises(grpc.RpcError) as info:
        call()
    error = info.value
    assert isinstance(error, grpc.Call)
    trailing = dict(error.trailing_metadata() or ())
    return Failure(error.code(), error.details() or "", str(trailing.get("vmm-code", "")))


def make_stub(channel: grpc.Channel) -> Any:
    """The generated client (untyped: grpcio-tools writes no stubs for it)."""
    return VmmStub(channel)  # type: ignore[no-untyped-call]


# What each HTTP status of an error may become over gRPC.
GRPC_FOR_HTTP = {
    400: {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNIMPLEMENTED},
    401: {grpc.StatusCode.UNAUTHENTICATED},
    404: {grpc.StatusCode.NOT_FOUND},
    409: {grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED},
    413: {grpc.StatusCode.RESOURCE_EXHAUSTED},
    500: {grpc.StatusCode.INTERNAL},
    503: {grpc.StatusCode.UNAVAILABLE},
    507: {grpc.StatusCode.INTERNAL, grpc.StatusCode.RESOURCE_EXHAUSTED},
}


def test_every_error_class_has_a_fitting_grpc_status() -> None:
    """Every VmmError class in vmm/ (all modules imported) becomes the gRPC status its HTTP
    status stands for, and every code of vmm.core.exceptions is mapped explicitly."""
    import vmm  # noqa: PLC0415

    for module in pkgutil.walk_packages(vmm.__path__, "vmm."):
        if not module.name.endswith("__main__"):  # that one runs the daemon
            importlib.import_module(module.name)

    def subclasses(cls: type[exceptions.VmmError]) -> Iterator[type[exceptions.VmmError]]:
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    classes: list[type[exceptions.VmmError]] = [exceptions.VmmError,
                                                 *subclasses(exceptions.VmmError)]
    assert any(c.code == "BAD_IMAGE" for c in classes)  # one defined outside exceptions.py
    for cls in classes:
        assert grpc_status(cls) in GRPC_FOR_HTTP[cls.status_code], cls
    core_codes = {c.code for c in classes if c.__module__ == exceptions.__name__}
    assert core_codes <= STATUS_OF_CODE.keys(), core_codes - STATUS_OF_CODE.keys()


def test_grpc_targets() -> None:
    """Our address forms become grpcio bind targets (IPv6 bracketed, unix kept)."""
    assert grpc_target("tcp:127.0.0.1:5000") == "127.0.0.1:5000"
    assert grpc_target("tcp:[::1]:5000") == "[::1]:5000"
    assert grpc_target("unix:/run/vmm.grpc") == "unix:/run/vmm.grpc"


def test_auth_is_required(stub: Any) -> None:
    """No credentials, or a wrong bearer token, is UNAUTHENTICATED; the right token passes."""
    error = failure(lambda: stub.Version(Empty(), timeout=10))
    assert error.code == grpc.StatusCode.UNAUTHENTICATED
    assert error.vmm_code == "UNAUTHENTICATED"
    wrong = (("authorization", "Bearer nope"),)
    error = failure(lambda: stub.Version(Empty(), metadata=wrong, timeout=10))
    assert error.code == grpc.StatusCode.UNAUTHENTICATED
    assert stub.Version(Empty(), metadata=AUTH, timeout=10).version


def test_rpcs_that_need_no_vm(stub: Any, kms: KmsPeer,
                              grpc_daemon: tuple[DaemonProcess, int]) -> None:
    """Every RPC that boots nothing answers over gRPC as over /prpc, errors with their codes."""
    call = {"metadata": AUTH, "timeout": 30}
    meta = stub.GetMeta(Empty(), **call)
    assert meta.resources.max_allocable_vcpu == 20 and meta.log_level == "info"
    assert meta.host.backend == "qemu"
    assert IDLE_IMAGE in [i.name for i in stub.ListImages(Empty(), **call).images]
    digest = stub.GetComposeHash(pb.VmConfiguration(name="x", compose_file=COMPOSE), **call).hash
    assert len(digest) == 64
    app_id = bytes.fromhex("abcdef1234567890abcdef1234567890abcdef12")
    key = stub.GetAppEnvEncryptPubKey(pb.AppId(app_id=app_id), **call)
    assert key.public_key.hex() == expected_answer(app_id)["public_key"]
    assert not stub.ListGpus(Empty(), **call).gpus
    assert stub.Status(pb.StatusRequest(), **call).total == 0
    assert not stub.GetInfo(pb.Id(id="00000000-0000-0000-0000-000000000000"), **call).found
    assert stub.ReloadVms(Empty(), **call).loaded == 0
    assert stub.SvList(Empty(), **call) is not None
    assert not stub.ListRegistryImages(Empty(), **call).images
    stub.ReportDhcpLease(pb.DhcpLeaseRequest(mac="02:ab:cd:ef:01:23", ip="10.0.0.2"), **call)
    stub.SetLogLevel(pb.LogLevelRequest(level="debug"), **call)
    assert stub.GetMeta(Empty(), **call).log_level == "debug"
    stub.SetLogLevel(pb.LogLevelRequest(level="info"), **call)

    missing = pb.Id(id="00000000-0000-0000-0000-000000000000")
    cases = [
        (lambda: stub.StartVm(missing, **call), grpc.StatusCode.NOT_FOUND, "VM_NOT_FOUND"),
        (lambda: stub.PauseVm(missing, **call), grpc.StatusCode.NOT_FOUND, "VM_NOT_FOUND"),
        (lambda: stub.SvStop(missing, **call), grpc.StatusCode.NOT_FOUND, "NOT_FOUND"),
        (lambda: stub.SvRemove(missing, **call), grpc.StatusCode.NOT_FOUND, "NOT_FOUND"),
        (lambda: stub.StopVm(pb.Id(id="not a vm id!"), **call),
         grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
        (lambda: stub.ReportDhcpLease(pb.DhcpLeaseRequest(mac="x", ip="10.0.0.2"), **call),
         grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
        (lambda: stub.SetLogLevel(pb.LogLevelRequest(level="loud"), **call),
         grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
        (lambda: stub.PullRegistryImage(pb.PullRegistryImageRequest(tag="x"), **call),
         grpc.StatusCode.FAILED_PRECONDITION, "FAILED_PRECONDITION"),
        (lambda: stub.DeleteImage(pb.Id(id="no-such-image"), **call),
         grpc.StatusCode.NOT_FOUND, "NOT_FOUND"),
    ]
    for run, status, code in cases:
        error = failure(run)
        assert (error.code, error.vmm_code) == (status, code), error
        assert error.details
    kms.fail_with = 500
    try:
        error = failure(lambda: stub.GetAppEnvEncryptPubKey(pb.AppId(app_id=b"\x01"), **call))
    finally:
        kms.fail_with = None
    assert error.code == grpc.StatusCode.UNAVAILABLE
    assert kms.url in error.details

    # gRPC calls are counted with the /prpc ones.
    daemon = grpc_daemon[0]
    metrics = httpx.get(f"{daemon.base_url}/metrics", timeout=30,
                        headers={"authorization": f"Bearer {TOKEN}"}).text
    assert 'vmm_rpc_requests_total{code="VM_NOT_FOUND",method="StartVm"} 1.0' in metrics


def test_lifecycle_of_a_stopped_vm(stub: Any) -> None:
    """Create (stopped), GetInfo, UpdateVm, UpgradeApp, ResizeVm, StopVm, Shutdown/Pause
    refused, RemoveVm: the stopped-VM lifecycle over gRPC."""
    call = {"metadata": AUTH, "timeout": 30}
    vm_id = stub.CreateVm(pb.VmConfiguration(
        name="grpc-vm", image=IDLE_IMAGE, compose_file=COMPOSE, vcpu=1, memory=256, disk_size=1,
        stopped=True), **call).id
    info = stub.GetInfo(pb.Id(id=vm_id), **call)
    assert info.found and info.info.status == "stopped" and info.info.name == "grpc-vm"
    new_compose = compose("updated")
    stub.UpdateVm(pb.UpdateVmRequest(id=vm_id, compose_file=new_compose), **call)
    stub.UpgradeApp(pb.UpdateVmRequest(id=vm_id, user_config="{}"), **call)
    stub.ResizeVm(pb.ResizeVmRequest(id=vm_id, vcpu=2, memory=384), **call)
    config = stub.GetInfo(pb.Id(id=vm_id), **call).info.configuration
    assert (config.vcpu, config.memory) == (2, 384)
    assert json.loads(config.compose_file) == json.loads(new_compose)
    assert config.user_config == "{}"
    stub.StopVm(pb.Id(id=vm_id), **call)
    for refused in (stub.ShutdownVm, stub.PauseVm, stub.ResumeVm):
        error = failure(lambda refused=refused: refused(pb.Id(id=vm_id), **call))  # type: ignore[misc]
        assert error.code == grpc.StatusCode.FAILED_PRECONDITION
    assert [v.id for v in stub.Status(pb.StatusRequest(), **call).vms] == [vm_id]
    stub.RemoveVm(pb.Id(id=vm_id), **call)
    wait_for("the VM to go", lambda: not stub.GetInfo(pb.Id(id=vm_id), **call).found, 30)


def test_sigterm_ends_grpc_and_uvicorn_cleanly() -> None:
    """SIGTERM stops the daemon with the gRPC listener on: exit 0, no task left, port closed."""
    with short_dir("vmgs") as workdir:
        port = free_port()
        daemon = start_daemon(workdir, extra_config=f'grpc_address = "tcp:127.0.0.1:{port}"\n')
        try:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                assert make_stub(channel).Version(Empty(), timeout=10).version
            assert f"gRPC on tcp:127.0.0.1:{port}" in daemon.log()
            daemon.proc.send_signal(signal.SIGTERM)
            assert daemon.proc.wait(timeout=30) == 0
            log = daemon.log()
            assert "stopped: no tasks left" in log, log
            assert "tasks still running" not in log
            assert "Traceback" not in log
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                error = failure(lambda: make_stub(channel).Version(Empty(), timeout=3))
                assert error.code == grpc.StatusCode.UNAVAILABLE
        finally:
            daemon.destroy()
