"""The package's shape: imports point one way, no module imports another that imports it back, the library
never imports the CLI, and no private API of torch or Optuna is used (STYLE.md, conventions 11 and 12)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from conftest import REPO

SRC = REPO / "src"
PACKAGE = SRC / "ewcstab"


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__")


def imports() -> dict[str, set[str]]:
    """Module -> the package's modules it imports (``from pkg import submodule`` counts as the submodule)."""
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ewcstab"):
                subs = {f"{node.module}.{a.name}" for a in node.names} & files.keys()
                deps |= subs if len(subs) == len(node.names) else {node.module}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("ewcstab")}
        graph[name] = deps - {name}
    return graph


def test_no_import_cycles():
    graph = imports()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(dep):] + [dep]))
            if dep in graph and dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_the_library_never_imports_the_cli():
    library = {m: d for m, d in imports().items() if not m.startswith("ewcstab.cli") and m != "ewcstab.__main__"}
    offenders = {m: sorted(d) for m, d in library.items() if any(x.startswith("ewcstab.cli") for x in d)}
    assert not offenders, offenders


def test_leaf_modules_import_nothing_of_the_package():
    graph = imports()
    for leaf in ("ewcstab.errors", "ewcstab.interfaces", "ewcstab.records"):
        assert graph[leaf] == set(), (leaf, graph[leaf])


def test_no_private_apis_and_no_native_layer():
    pattern = re.compile(r"ctypes|torch\.ops\.aten|torch\._[a-z]|_fused_adam_|optuna\.[a-z_.]*\._|\._storage|_trial_id")
    hits = [f"{p.relative_to(REPO)}:{i}: {line.strip()}" for p in PACKAGE.rglob("*.py")
            for i, line in enumerate(p.read_text().splitlines(), start=1) if pattern.search(line)]
    assert not hits, "\n".join(hits)
    assert not list(PACKAGE.rglob("*.c"))
