"""The GuestApi methods and their pRPC JSON dispatch, shared by the HTTP and frame transports.

A call is ``handle(path, body) -> Reply``. Every method takes ``Empty``, so a request body is
only checked to be JSON when there is one (an ``Empty`` in protobuf binary is zero bytes, so
binary clients work too). Answers are always JSON: ``Empty`` is ``null``, ``bytes`` are lowercase
hex, errors are 400 ``{"error": msg}``.
"""

import json
from collections.abc import Callable
from pathlib import Path

from guest_agent import __version__
from guest_agent.identity import Identity

PREFIX = "/api/"
SERVICE = "GuestApi"

#: Shown as GuestInfo.app_cert. A development guest has no TEE and no KMS, so there is no key
#: to certify; the text says so rather than carrying a certificate nobody could verify.
DEV_APP_CERT = (
    "-----BEGIN DEVELOPMENT PLACEHOLDER-----\n"
    "vmm development guest: no TEE, no KMS, no app certificate.\n"
    "This text stands where a dstack CVM reports its RA-TLS app certificate.\n"
    "-----END DEVELOPMENT PLACEHOLDER-----\n"
)
TCB_INFO = json.dumps({"tee": "none", "development": True})


class Reply:
    """An answer, and what to run once it has been written (Shutdown powers off after)."""

    __slots__ = ("after", "body", "status")

    def __init__(self, status: int, value: object, after: Callable[[], None] | None = None) -> None:
        self.status = status
        self.body = json.dumps(value).encode()
        self.after = after


def error(message: str, status: int = 400) -> Reply:
    return Reply(status, {"error": message})


def method_name(path: str) -> str | None:
    """``Info`` from ``/api/Info``, ``/api/Info?json`` or ``/api/GuestApi.Info``."""
    route = path.split("?", 1)[0]
    if not route.startswith(PREFIX):
        return None
    name = route.removeprefix(PREFIX)
    return name.removeprefix(f"{SERVICE}.").removeprefix(f"guest_api.{SERVICE}.")


class GuestApi:
    def __init__(
        self,
        identity: Identity,
        shutdown: Callable[[], None],
        docker_socket: Path | None = None,
    ) -> None:
        self.identity = identity
        self.shutdown = shutdown
        self.docker_socket = docker_socket
        self._methods: dict[str, Callable[[], Reply]] = {
            "Info": self.info,
            "SysInfo": self.sys_info,
            "NetworkInfo": self.network_info,
            "ListContainers": self.list_containers,
            "Shutdown": self.shutdown_call,
        }

    def handle(self, path: str, body: bytes) -> Reply:
        name = method_name(path)
        if name is None:
            return error(f"not found: {path.split('?', 1)[0]}", 404)
        method = self._methods.get(name)
        if method is None:
            return error(f"Service not found: {name}")
        if body.strip():
            try:
                json.loads(body)
            except ValueError as exc:
                return error(f"invalid JSON request body: {exc}")
        try:
            return method()
        except Exception as exc:  # any failure is the caller's 400, not a crash
            return error(f"{name} failed: {exc}")

    def info(self) -> Reply:
        ident = self.identity
        return Reply(
            200,
            {
                "version": __version__,
                "app_id": ident.app_id.hex(),
                "instance_id": ident.instance_id.hex(),
                "app_cert": DEV_APP_CERT,
                "tcb_info": TCB_INFO,
                "device_id": ident.device_id.hex(),
            },
        )

    def sys_info(self) -> Reply:
        from guest_agent import sysinfo  # noqa: PLC0415 - kept off the boot path

        return Reply(200, sysinfo.system_info())

    def network_info(self) -> Reply:
        from guest_agent import netinfo  # noqa: PLC0415 - kept off the boot path

        return Reply(200, netinfo.network_info())

    def list_containers(self) -> Reply:
        from guest_agent import containers  # noqa: PLC0415 - kept off the boot path

        if self.docker_socket is None:
            return Reply(200, containers.list_containers())
        return Reply(200, containers.list_containers(self.docker_socket))

    def shutdown_call(self) -> Reply:
        return Reply(200, None, after=self.shutdown)
