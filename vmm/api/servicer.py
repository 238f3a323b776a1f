"""The Vmm service: one method per RPC of ``vmm_rpc.proto``, served by the /prpc bridge.

Methods validate their input, delegate to the daemon's parts and build the reply message. The
bridge refuses to start if a method of the service is missing here, so no RPC can be forgotten.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING

from google.protobuf.empty_pb2 import Empty

from vmm.backend.qemu.backend import QemuBackend
from vmm.core import log_level
from vmm.core.exceptions import Conflict, InvalidField, NotFound
from vmm.core.names import VM_ID, check_name
from vmm.core.version import __version__, git_revision
from vmm.host import gpus
from vmm.model import compose, images
from vmm.net import leases, nics, passt
from vmm.prpc import codec
from vmm.prpc.bridge import CallContext
from vmm.rpc import vmm_rpc_pb2 as pb
from vmm.supervisor.client import SupervisorClient
from vmm.supervisor.types import ProcessInfo
from vmm.vms import reconcile
from vmm.vms import update as vm_update

if TYPE_CHECKING:
    from vmm.daemon import Daemon

log = logging.getLogger(__name__)

_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


def _sv_process(info: ProcessInfo) -> pb.SvProcessInfo:
    state = info.state
    status: str = state.status
    if status == "exited":
        code = state.exit_code if state.exit_code is not None else (
            f"signal {state.signal}" if state.signal is not None else "?")
        status = f"exited({code})"
    elif status == "error":
        status = f"error({state.error or ''})"
    process = pb.SvProcessInfo(
        id=info.config.id, name=info.config.name, status=status,
        command=" ".join([info.config.command, *info.config.args]), note=info.config.note,
    )
    if state.pid is not None:
        process.pid = state.pid
    return process


def _vm_id(request: pb.Id) -> str:
    """The request's VM (or supervisor process) id, refused unless it passes the VM id rule."""
    return check_name(request.id, "id", VM_ID)


class VmmServicer:
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.config = daemon.config
        self._version = codec.Encoded.constant(
            pb.VersionResponse(version=__version__, rev=git_revision()))

    # -- RPCs that need no VM --------------------------------------------------------------

    async def Version(self, request: Empty, ctx: CallContext) -> codec.Encoded:
        return self._version

    async def GetMeta(self, request: Empty, ctx: CallContext) -> pb.GetMetaResponse:
        cvm = self.config.cvm
        host = self.daemon.host
        usage = self.daemon.resource_usage()
        backend = self.daemon.backend.info
        net = cvm.networking
        modes = nics.available_modes(net, passt_found=bool(passt.passt_binary()))
        return pb.GetMetaResponse(
            kms=pb.KmsSettings(url=cvm.kms_urls[0] if cvm.kms_urls else "", urls=cvm.kms_urls),
            gateway=pb.GatewaySettings(
                url=cvm.gateway_urls[0] if cvm.gateway_urls else "",
                base_domain=self.config.gateway.base_domain,
                port=self.config.gateway.port,
                agent_port=self.config.gateway.agent_port,
                urls=cvm.gateway_urls,
            ),
            resources=pb.ResourcesSettings(
                max_cvm_number=cvm.cid_pool_size,
                max_allocable_vcpu=cvm.max_allocable_vcpu,
                max_allocable_memory_in_mb=cvm.max_allocable_memory_in_mb,
                used_cvm_number=usage.vms,
                used_vcpu=usage.vcpu,
                used_memory_in_mb=usage.memory_mb,
                free_cvm_number=max(cvm.cid_pool_size - usage.vms, 0),
                free_vcpu=max(cvm.max_allocable_vcpu - usage.vcpu, 0),
                free_memory_in_mb=max(cvm.max_allocable_memory_in_mb - usage.memory_mb, 0),
            ),
            networking=pb.NetworkingCapabilities(
                supported_modes=modes,
                default_mode="" if net.mode == "custom" else net.mode,
                default_bridge=net.bridge,
            ),
            host=pb.HostCapabilities(
                accelerator=host.accel,
                tee_platform=host.tee,
                guest_channel=host.channel,
                qemu_version=host.qemu_version,
                cpu_model=host.cpu_model,
                backend=backend.name,
                backend_version=backend.version,
                backend_features=backend.features,
                backend_unsupported=backend.unsupported,
            ),
            config_file=self.daemon.config_file,
            log_level=log_level.current_level(),
        )

    async def SetLogLevel(self, request: pb.LogLevelRequest, ctx: CallContext) -> Empty:
        try:
            log_level.set_level(request.level)
        except ValueError as exc:
            raise InvalidField("level", str(exc)) from None
        log.warning("log level set to %s by %s", request.level, ctx.client)
        return Empty()

    async def ListImages(self, request: Empty, ctx: CallContext) -> pb.ImageListResponse:
        # Every image's metadata is read from disk: in a worker thread, so a slow or stuck
        # image directory (a network mount) holds this call and never the event loop.
        found = await asyncio.to_thread(images.list_images, Path(self.config.image.path))
        return pb.ImageListResponse(
            images=[
                pb.ImageInfo(
                    name=image.name,
                    description=image.description,
                    version=image.version,
                    is_dev=image.is_dev,
                )
                for image in found
            ]
        )

    async def GetComposeHash(self, request: pb.VmConfiguration, ctx: CallContext) -> pb.ComposeHash:
        compose.validate_name(request.name)
        compose.parse_compose(request.compose_file)
        return pb.ComposeHash(hash=compose.compose_hash(request.compose_file))

    async def GetAppEnvEncryptPubKey(
        self, request: pb.AppId, ctx: CallContext
    ) -> pb.PublicKeyResponse:
        if not request.app_id:
            raise InvalidField("app_id", "is required (hex bytes)")
        return await self.daemon.kms.get_app_env_encrypt_pub_key(request.app_id)

    async def ListGpus(self, request: Empty, ctx: CallContext) -> pb.ListGpusResponse:
        gpu_config = self.config.cvm.gpu
        found: list[gpus.PciDevice] = []
        if gpu_config.enabled:
            found = gpus.list_gpus(gpus.parse_lspci(await asyncio.to_thread(gpus.read_lspci)),
                                   gpu_config)
        return pb.ListGpusResponse(
            gpus=[pb.GpuInfo(slot=d.slot, product_id=d.pci_id, description=d.description,
                             is_free=d.is_free) for d in found],
            allow_attach_all=gpu_config.allow_attach_all,
        )

    # -- VM lifecycle ---------------------------------------------------------------------------

    async def CreateVm(self, request: pb.VmConfiguration, ctx: CallContext) -> pb.Id:
        return pb.Id(id=await self.daemon.manager.create(request))

    # A manual start, stop or shutdown hands the VM back to the operator: auto-restart forgets
    # its attempts (and a give-up) for it.
    async def StartVm(self, request: pb.Id, ctx: CallContext) -> Empty:
        self.daemon.manager.auto_restart.reset(_vm_id(request))
        await self.daemon.manager.start(_vm_id(request))
        return Empty()

    async def StopVm(self, request: pb.Id, ctx: CallContext) -> Empty:
        self.daemon.manager.auto_restart.reset(_vm_id(request))
        await self.daemon.manager.stop(_vm_id(request))
        return Empty()

    async def ShutdownVm(self, request: pb.Id, ctx: CallContext) -> Empty:
        self.daemon.manager.auto_restart.reset(_vm_id(request))
        await self.daemon.manager.shutdown(_vm_id(request))
        return Empty()

    async def PauseVm(self, request: pb.Id, ctx: CallContext) -> Empty:
        await self.daemon.manager.pause(_vm_id(request))
        return Empty()

    async def ResumeVm(self, request: pb.Id, ctx: CallContext) -> Empty:
        await self.daemon.manager.resume(_vm_id(request))
        return Empty()

    async def RemoveVm(self, request: pb.Id, ctx: CallContext) -> Empty:
        await self.daemon.manager.remove(_vm_id(request))
        return Empty()

    async def Status(self, request: pb.StatusRequest, ctx: CallContext) -> codec.Encoded:
        return self.daemon.manager.report.status_encoded(request)

    async def GetInfo(self, request: pb.Id, ctx: CallContext) -> pb.GetInfoResponse:
        vm = self.daemon.manager.vms.get(_vm_id(request))
        if vm is None:
            return pb.GetInfoResponse(found=False)
        return pb.GetInfoResponse(found=True, info=self.daemon.manager.report.vm_info(vm, brief=False))

    async def UpdateVm(self, request: pb.UpdateVmRequest, ctx: CallContext) -> pb.Id:
        plan = await vm_update.apply(self.daemon.manager, vm_update.from_update_vm(request))
        return pb.Id(id=plan.app_id)

    async def UpgradeApp(self, request: pb.UpdateVmRequest, ctx: CallContext) -> pb.Id:
        return await self.UpdateVm(request, ctx)

    async def ResizeVm(self, request: pb.ResizeVmRequest, ctx: CallContext) -> Empty:
        await vm_update.apply(self.daemon.manager, vm_update.from_resize_vm(request))
        return Empty()

    async def ReloadVms(self, request: Empty, ctx: CallContext) -> pb.ReloadVmsResponse:
        result = await reconcile.reload(self.daemon.manager)
        return pb.ReloadVmsResponse(loaded=result.loaded, updated=result.updated,
                                    removed=result.removed)

    # -- the supervisor's process table ---------------------------------------------------------

    # -- supervisor: extras of the QEMU backend -------------------------------------------------

    def _supervisor(self) -> SupervisorClient:
        backend = self.daemon.backend
        if not isinstance(backend, QemuBackend):
            raise Conflict(f"the Sv* RPCs manage the QEMU backend's supervisor; this daemon "
                           f"runs VMs with the {backend.info.name} backend")
        return backend.supervisor

    async def _sv_process(self, request: pb.Id) -> ProcessInfo:
        process_id = _vm_id(request)
        info = await self._supervisor().info(process_id)
        if info is None:
            raise NotFound(f"Supervisor process not found: {process_id!r}")
        return info

    async def SvList(self, request: Empty, ctx: CallContext) -> pb.SvListResponse:
        processes = await self._supervisor().list()
        return pb.SvListResponse(processes=[_sv_process(p) for p in processes])

    async def SvStop(self, request: pb.Id, ctx: CallContext) -> Empty:
        manager = self.daemon.manager
        process_id = (await self._sv_process(request)).config.id
        vm = manager.vms.get(process_id)
        if vm is not None:
            await manager.stop(process_id)  # keeps the VM's desired state honest
        else:
            await self._supervisor().stop(process_id)
        return Empty()

    async def SvRemove(self, request: pb.Id, ctx: CallContext) -> Empty:
        manager = self.daemon.manager
        info = await self._sv_process(request)
        process_id = info.config.id
        vm = manager.vms.get(process_id)
        if info.state.status == "running" or (vm is not None and vm.started):
            raise Conflict(f"process {process_id} is running or should run; stop it first")
        await self._supervisor().remove(process_id)
        return Empty()

    # -- images ---------------------------------------------------------------------------------

    async def ListRegistryImages(
        self, request: Empty, ctx: CallContext
    ) -> pb.RegistryImageListResponse:
        found = await self.daemon.image_pulls.listing()
        return pb.RegistryImageListResponse(images=[
            pb.RegistryImageInfo(tag=i.tag, local=i.local, pulling=i.pulling, error=i.error,
                                 bytes_done=i.bytes_done, bytes_total=i.bytes_total)
            for i in found
        ])

    async def PullRegistryImage(
        self, request: pb.PullRegistryImageRequest, ctx: CallContext
    ) -> Empty:
        self.daemon.image_pulls.start(request.tag)
        log.info("pulling image tag %s", request.tag)
        return Empty()

    async def DeleteImage(self, request: pb.Id, ctx: CallContext) -> Empty:
        users = [(vm.manifest.image, vm.manifest.name) for vm in self.daemon.manager.vms.values()]
        await asyncio.to_thread(
            images.delete_image, Path(self.config.image.path), request.id, users, field="id"
        )
        log.info("deleted image %s", request.id)
        return Empty()

    async def ReportDhcpLease(self, request: pb.DhcpLeaseRequest, ctx: CallContext) -> Empty:
        mac = request.mac.strip().lower()
        if not _MAC_RE.match(mac):
            example = "02:ab:cd:ef:01:23"
            raise InvalidField("mac", f"{request.mac!r} is not a MAC address like {example}")
        try:
            ip = ipaddress.IPv4Address(request.ip.strip())
        except ValueError:
            raise InvalidField("ip", f"{request.ip!r} is not an IPv4 address") from None
        try:
            event = leases.event_of(request.event)
        except ValueError as exc:
            raise InvalidField("event", str(exc)) from None
        # dnsmasq calls this for every lease on the bridge; MACs that are not ours are ignored.
        await self.daemon.manager.leases.report(event, mac, str(ip))
        return Empty()
