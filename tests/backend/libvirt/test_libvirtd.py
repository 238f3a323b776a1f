"""The private test libvirtd: it leaves the host as it was, and accepts every golden domain."""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import replace
from pathlib import Path

import libvirt  # type: ignore[import-untyped]
import pytest

from tests.backend.libvirt.cases import CASES, dev_case
from tests.support.libvirtd import HOST_DIRS, private_libvirtd
from vmm.backend.base import LaunchSpec
from vmm.backend.libvirt.domain import build_domain_xml, domain_name, domain_uuid


def tcg_variant(spec: LaunchSpec) -> LaunchSpec:
    """The same VM under TCG: libvirt refuses domain type 'kvm' on a host without KVM."""
    return replace(spec, host=replace(spec.host, accel="tcg", cpu_model="max"))


def host_snapshot() -> dict[str, object]:
    """What the test daemon must not change: libvirt's host paths, accounts, pid file, cgroups."""
    snapshot: dict[str, object] = {}
    for path in (*HOST_DIRS, "/run/libvirtd.pid"):
        root = Path(path)
        if root.is_dir():
            snapshot[path] = sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns)
                                    for p in root.rglob("*"))  # fmt: skip
        else:
            snapshot[path] = root.exists()
    for account in ("/etc/passwd", "/etc/group"):
        snapshot[account] = hashlib.sha256(Path(account).read_bytes()).hexdigest()
    snapshot["cgroups"] = sorted(str(p) for p in Path("/sys/fs/cgroup").glob("*/machine*"))
    return snapshot


def test_private_libvirtd_leaves_the_host_untouched() -> None:
    """Defining a domain and restarting the daemon write only under its temp root, never the host."""
    if shutil.which("libvirtd") is None:
        pytest.skip("libvirtd is not installed (scripts/install adds it)")
    before = host_snapshot()
    spec, config = dev_case()
    with private_libvirtd() as daemon:
        connection = libvirt.open(daemon.uri)
        try:
            connection.defineXML(build_domain_xml(spec, config))
        finally:
            connection.close()
        # The definition landed in the namespace's /etc/libvirt, which is the temp root.
        assert (daemon.root / "fs/etc/libvirt/qemu" / f"{domain_name(spec.manifest.id)}.xml").is_file()
        assert host_snapshot() == before
        daemon.restart()  # a second namespace over the same root
        connection = libvirt.open(daemon.uri)
        try:
            assert [d.name() for d in connection.listAllDomains(0)] == [domain_name(spec.manifest.id)]
        finally:
            connection.close()
        assert host_snapshot() == before
    assert host_snapshot() == before


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden_cases_define_on_libvirtd(name: str, conn: libvirt.virConnect) -> None:
    """libvirtd itself (not only the schema) accepts each case's domain XML."""
    spec, config = CASES[name]()
    domain = conn.defineXML(build_domain_xml(tcg_variant(spec), config))
    assert domain.UUIDString() == domain_uuid(spec.manifest.id)
    assert domain.name() == domain_name(spec.manifest.id)
