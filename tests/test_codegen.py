"""Generated protobuf code is fresh against proto/ and its runtime pin is satisfiable."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

from google.protobuf import __version__ as protobuf_version

from vmm.rpc import vmm_rpc_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent
GENERATED = ROOT / "vmm" / "rpc"


def test_generated_code_matches_proto(tmp_path: Path) -> None:
    """Regenerating from proto/ gives byte-identical files: nobody edited or forgot them."""
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "codegen"), "--out", str(tmp_path)],
        check=True, timeout=120,
    )
    fresh = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    committed = {p.name: p.read_bytes() for p in GENERATED.iterdir() if p.is_file()}
    assert sorted(fresh) == sorted(committed)
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"stale generated files (run scripts/codegen): {stale}"


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def test_protobuf_runtime_pin_covers_the_generated_code() -> None:
    """pyproject pins protobuf at or above the version the generated code demands."""
    source = (GENERATED / "vmm_rpc_pb2.py").read_text()
    match = re.search(
        r"ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,\s*(\d+),\s*(\d+),"
        r"\s*(\d+),", source,
    )
    assert match, "generated code no longer declares its runtime version"
    needed = tuple(int(g) for g in match.groups())
    with (ROOT / "pyproject.toml").open("rb") as fp:
        deps = tomllib.load(fp)["project"]["dependencies"]
    (spec,) = [d for d in deps if d.startswith("protobuf")]
    floor = re.search(r">=([\d.]+)", spec)
    assert floor
    assert _version(floor.group(1)) >= needed
    assert _version(protobuf_version) >= needed


def test_vmm_service_keeps_dstack_field_numbers() -> None:
    """Spot-check the wire contract: field numbers dstack clients depend on."""
    def numbers(message: type) -> dict[str, int]:
        return {f.name: f.number for f in message.DESCRIPTOR.fields}  # type: ignore[attr-defined]

    assert numbers(pb.VmConfiguration) | {} == {
        "name": 1, "image": 2, "compose_file": 3, "vcpu": 4, "memory": 5, "disk_size": 6,
        "ports": 7, "encrypted_env": 8, "app_id": 9, "user_config": 10, "hugepages": 11,
        "pin_numa": 12, "gpus": 13, "kms_urls": 14, "gateway_urls": 15, "stopped": 16,
        "no_tee": 17, "networking": 18, "networks": 19, "simulated_tee": 21,
    }
    assert numbers(pb.UpdateVmRequest)["gpus"] == 13
    assert numbers(pb.UpdateVmRequest)["no_tee"] == 18
    assert numbers(pb.VmInfo)["events"] == 14
    assert numbers(pb.VmInfo)["interfaces"] == 15
    assert numbers(pb.GetInfoResponse) == {"found": 1, "info": 2}
    methods = [m.name for m in pb.DESCRIPTOR.services_by_name["Vmm"].methods]
    assert methods[:5] == ["CreateVm", "StartVm", "StopVm", "RemoveVm", "UpgradeApp"]
    assert "ReportDhcpLease" in methods
