"""The one place a config string becomes a backend, as uvicorn maps ``http = "h11"``.

Each entry names a module and its ``open_backend(config, host)`` coroutine; the module is
imported only when chosen, so the QEMU backend never loads libvirt's binding.
"""

from __future__ import annotations

import importlib
from collections.abc import Awaitable, Callable
from typing import cast

from vmm.backend.base import VmBackend
from vmm.core.config import Config
from vmm.core.exceptions import ConfigError
from vmm.host.capabilities import HostCapabilities

BACKENDS: dict[str, str] = {
    "qemu": "vmm.backend.qemu.backend:open_backend",
    "libvirt": "vmm.backend.libvirt.backend:open_backend",
}

Opener = Callable[[Config, HostCapabilities], Awaitable[VmBackend]]


async def open_backend(config: Config, host: HostCapabilities) -> VmBackend:
    """Connect to (or start) the backend ``[cvm] backend`` names."""
    name = config.cvm.backend
    target = BACKENDS.get(name)
    if target is None:
        raise ConfigError(f"`cvm.backend`: unknown backend {name!r} (one of {', '.join(BACKENDS)})")
    module_name, _, attribute = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"`cvm.backend`: the {name} backend cannot be loaded: {exc}") from None
    opener = cast(Opener, getattr(module, attribute))
    return await opener(config, host)
