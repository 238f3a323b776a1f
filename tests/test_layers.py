"""The package's layers: no import cycles, and each layer imports only the layers below it.

Every import counts, including those inside functions and under TYPE_CHECKING: a late import is
still a dependency. The generated protobuf modules (vmm.rpc) are a leaf anyone may use.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("vmm", "guest_proxy", "guest_agent")

# What each layer may import besides itself, core and the generated vmm.rpc (design.md:
# "Layout of the daemon package"). The lifecycle layer sees backends only through their seam.
ALLOWED: dict[str, set[str]] = {
    "vmm.core": set(),
    "vmm.prpc": set(),
    "vmm.supervisor": set(),
    "vmm.model": set(),
    "vmm.host": {"vmm.model"},
    "vmm.net": {"vmm.model"},
    "vmm.peers": {"vmm.prpc"},
    # LaunchSpec carries the NICs vmm.net resolved, so both backends render the same ones.
    "vmm.backend.base": {"vmm.model", "vmm.host", "vmm.net"},
    "vmm.backend.disk": {"vmm.backend.base", "vmm.model"},
    "vmm.backend.select": {"vmm.backend.base", "vmm.host"},
    "vmm.backend.qemu": {"vmm.backend.base", "vmm.backend.disk", "vmm.model", "vmm.host",
                         "vmm.net", "vmm.supervisor"},
    "vmm.backend.libvirt": {"vmm.backend.base", "vmm.backend.disk", "vmm.backend.qemu.argv",
                            "vmm.model", "vmm.host", "vmm.net"},
    "vmm.guest": {"vmm.model", "vmm.host", "vmm.prpc", "guest_proxy.transport", "guest_agent"},
    "vmm.vms": {"vmm.backend.base", "vmm.model", "vmm.host", "vmm.net", "vmm.peers",
                "vmm.guest", "vmm.prpc", "guest_proxy.transport"},
    "guest_proxy": {"vmm.prpc", "guest_agent"},
    "guest_agent": set(),  # runs inside the guest: not even vmm.core
    "vmm.cli_client": set(),  # vmm-cli: a client of the daemon's HTTP API, nothing else
}
# Entry points and the composition root may import anything; nothing imports them.
TOP = ("vmm.api", "vmm.daemon", "vmm.cli", "vmm.client_cli", "vmm.__main__")


def module_files() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[:2] == ["vmm", "rpc"]:
                continue
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def imports_of(path: Path, module: str, known: set[str]) -> set[str]:
    """The project modules ``path`` imports (``from pkg import mod`` counts as ``pkg.mod``)."""
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}".rstrip(".")
            names = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for name in names:
            target = name
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != module:
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    files = module_files()
    known = set(files)
    return {module: imports_of(path, module, known) for module, path in files.items()}


def layer_of(module: str) -> str | None:
    matches = [layer for layer in ALLOWED if module == layer or module.startswith(layer + ".")]
    return max(matches, key=len) if matches else None


def test_no_import_cycles() -> None:
    """No module reaches itself through its imports (Tarjan's strongly connected components)."""
    edges = graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(edges.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    assert cycles == []


def allowed(importer: str, imported: str) -> bool:
    if importer.startswith(imported + "."):
        return True  # a package's own __init__, which every import of a submodule runs anyway
    if importer.startswith("guest_agent"):
        return imported.startswith("guest_agent")
    if imported.startswith(("vmm.core", "vmm.rpc")) or imported in ("vmm", "guest_agent"):
        return True
    if importer.startswith(TOP) or importer in ("vmm", "vmm.backend"):
        return not imported.startswith(TOP) or importer.startswith(TOP)
    layer = layer_of(importer)
    assert layer is not None, f"{importer} belongs to no layer: add it to ALLOWED"
    same = imported == layer or imported.startswith(layer + ".")
    return same or any(imported == a or imported.startswith(a + ".") for a in ALLOWED[layer])


def test_each_layer_imports_only_what_it_may() -> None:
    """vms/ never imports a backend implementation or the supervisor; core imports nothing."""
    violations = sorted(f"{src} -> {dst}" for src, targets in graph().items() for dst in targets
                        if not allowed(src, dst))
    assert violations == []


@pytest.mark.parametrize(("importer", "imported"), [
    ("vmm.vms.manager", "vmm.backend.qemu.backend"),
    ("vmm.vms.reconcile", "vmm.supervisor.client"),
    ("vmm.model.vm", "vmm.guest.hub"),
    ("vmm.core.config", "vmm.model.manifest"),
    ("guest_proxy.proxy", "vmm.vms.manager"),
    ("vmm.vms.manager", "vmm.api.app"),
    ("guest_agent.agent", "vmm.core.exceptions"),
])
def test_the_rules_catch_a_forbidden_import(importer: str, imported: str) -> None:
    """The checker itself: imports that would break the layering are refused."""
    assert not allowed(importer, imported)
