"""The package's layers (README, Development): imports only go down, there are no cycles, no private name is used
across modules, nothing imports the CLI, and the command builders and the planner never import torch at import time.

The walk reads every module's imports with `ast` (those inside functions too: a lazy import is still a dependency).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import heavy_imports

PACKAGE = Path(__file__).resolve().parents[1] / "dpo_dist"

# bottom (0) to top. A module may import its own package and any package of a lower layer; packages on the same
# layer do not import each other.
LAYERS = {
    "compat": 0, "default": 0,
    "config": 1,
    "runtime": 2,
    "data": 3, "plan": 3, "load": 3,
    "sharding": 4,
    "launch": 5, "verify": 5,
    "train": 6,
    "reference": 7,
    "init": 8,
    "api": 9,
    "cli": 10,
    "__main__": 11,
}


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def package_of(mod: str) -> str:
    """dpo_dist.verify.weights -> verify; dpo_dist.api -> api."""
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else ""


def resolve(mod: str, path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = mod.split(".")
    if path.name != "__init__.py":
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(all_mods: dict[str, Path]):
    """(importer, imported module, names taken from it, line) for every import of a dpo_dist module, plus the
    private attributes read off imported dpo_dist modules (`mod._name`)."""
    found, private_attrs = [], []
    for mod, path in all_mods.items():
        tree = ast.parse(path.read_text(), str(path))
        bound: dict[str, str] = {}  # local name -> dpo_dist module it is bound to
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("dpo_dist"):
                        found.append((mod, a.name, [], node.lineno))
                        if a.asname:
                            bound[a.asname] = a.name
            elif isinstance(node, ast.ImportFrom):
                target = resolve(mod, path, node)
                if not target.startswith("dpo_dist"):
                    continue
                for a in node.names:
                    sub = f"{target}.{a.name}"
                    if sub in all_mods:  # `from dpo_dist.verify import weights`: the module itself
                        found.append((mod, sub, [], node.lineno))
                        bound[a.asname or a.name] = sub
                    else:
                        found.append((mod, target, [a.name], node.lineno))
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound \
                    and node.attr.startswith("_") and not node.attr.startswith("__"):
                private_attrs.append(f"{mod}:{node.lineno} reads {bound[node.value.id]}.{node.attr}")
    return found, private_attrs


def test_every_package_has_a_layer():
    packages = {package_of(m) for m in modules()} - {""}
    assert packages <= set(LAYERS), f"new package(s) without a layer: {packages - set(LAYERS)}: add them to LAYERS " \
                                     "and to the README's Development section"


def test_imports_only_go_down_and_nothing_imports_the_cli():
    all_mods = modules()
    found, _ = imports(all_mods)
    bad = []
    for importer, imported, _names, line in found:
        a, b = package_of(importer), package_of(imported)
        if not a or not b or a == b or a == "__main__":  # `python -m dpo_dist` is the CLI's entry point
            continue
        if b == "cli":
            bad.append(f"{importer}:{line} imports the CLI ({imported})")
        elif LAYERS[b] >= LAYERS[a]:
            bad.append(f"{importer}:{line} ({a}, layer {LAYERS[a]}) imports {imported} ({b}, layer {LAYERS[b]})")
    assert not bad, "imports that go up or sideways:\n" + "\n".join(bad)


def test_no_import_cycle_between_modules():
    all_mods = modules()
    found, _ = imports(all_mods)
    graph: dict[str, set[str]] = {m: set() for m in all_mods}
    for importer, imported, _names, _line in found:
        if imported in all_mods and imported != importer:
            graph[importer].add(imported)
        elif imported not in all_mods:  # a package's __init__ is not a module here: resolve to the nearest module
            parent = imported
            while parent and parent not in all_mods:
                parent = parent.rpartition(".")[0]
            if parent and parent != importer:
                graph[importer].add(parent)
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                cycles.append(stack[stack.index(m):] + [m])
            elif m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_no_private_name_used_across_modules():
    all_mods = modules()
    found, private_attrs = imports(all_mods)
    bad = [f"{importer}:{line} imports {imported}.{name}" for importer, imported, names, line in found
           for name in names if name.startswith("_") and not name.startswith("__")]
    assert not bad + private_attrs, "private names used outside their module:\n" + "\n".join(bad + private_attrs)


@pytest.mark.parametrize("package", ["launch", "plan", "config"])
def test_command_builders_and_planner_import_no_torch(package):
    mods = [m for m in modules() if package_of(m) == package]
    heavy = heavy_imports("".join(f"import {m}\n" for m in mods))
    assert heavy == [], f"{package}/ imports {heavy} at import time"
