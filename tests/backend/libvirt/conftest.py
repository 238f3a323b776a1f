"""Fixtures for the libvirt backend tests: a private libvirtd per module, and the async backend."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import libvirt  # type: ignore[import-untyped]
import pytest

from tests.support.libvirtd import Libvirtd, private_libvirtd


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def libvirtd() -> Iterator[Libvirtd]:
    """A libvirtd of this module's own, in a private mount namespace; ended by PID."""
    missing = [tool for tool in ("libvirtd", "unshare") if shutil.which(tool) is None]
    # Failures, not skips: scripts/install provides both, and a suite that quietly skipped the
    # libvirt backend would pass without testing it.
    if missing:
        pytest.fail(f"{', '.join(missing)} not installed (scripts/install adds libvirt)")
    if os.geteuid() != 0:
        pytest.fail("a private system libvirtd needs root (mount namespace, bind mounts)")
    with private_libvirtd() as daemon:
        yield daemon


@pytest.fixture
def conn(libvirtd: Libvirtd) -> Iterator[libvirt.virConnect]:
    """A plain libvirt connection; every domain left on the daemon is destroyed and undefined."""
    connection = libvirt.open(libvirtd.uri)
    try:
        yield connection
    finally:
        for domain in connection.listAllDomains(0):
            if domain.isActive():
                domain.destroy()
            domain.undefine()
        connection.close()
