"""The package's import graph: no cycles, and every import points down the layers.

Layers, top to bottom (docs/architecture.md): the command line → whole runs → training,
evaluation, interop, assets, analysis and features (side by side, never importing each other) →
model plumbing (``core``) → the bottom-level modules. The public facade
(``sae_e2e_plugin/__init__.py``) re-exports and is imported by no module of the package.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import sae_e2e_plugin

PACKAGE = "sae_e2e_plugin"
ROOT = Path(sae_e2e_plugin.__file__).parent

LAYERS: dict[str, int] = {
    "version": 0,
    "run_files": 0,
    "config_files": 0,
    "core": 1,
    "transcoders": 1,
    "training": 2,
    "evaluation": 2,
    "interop": 2,
    "assets": 2,
    "analysis": 2,
    "features": 2,
    "runs": 3,
    "cli": 4,
    "__main__": 5,
}
"""The layer of each top-level module or subpackage (its "group")."""

MAX_MODULE_LINES = 420


def module_names() -> dict[str, Path]:
    """Every module of the package by dotted name (subpackage ``__init__``s by package name)."""
    modules = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """The package modules ``path`` imports anywhere in its body (function-level imports too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from a.b import c` imports module a.b, and a.b.c when c is a module.
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {name for name in names if name in known}
    return found


def graph() -> dict[str, set[str]]:
    modules = module_names()
    return {name: imported_modules(path, set(modules)) for name, path in modules.items()}


def group(module: str) -> str:
    """``sae_e2e_plugin.training.loop.sae_trainer`` → ``training``; the facade is ``""``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_every_module_has_a_layer() -> None:
    unplaced = sorted({group(m) for m in module_names()} - set(LAYERS) - {""})
    assert not unplaced, f"give these a layer in LAYERS and docs/architecture.md: {unplaced}"


def upward_imports(edges: dict[str, set[str]]) -> list[str]:
    """Each import of the facade, or of a module in another group at the same or a higher layer."""
    wrong = []
    for module, imports in edges.items():
        if module == PACKAGE:
            continue  # the facade re-exports from every layer
        for target in imports:
            if target == PACKAGE:
                wrong.append(f"{module} imports the package facade; import the module itself")
            elif group(target) != group(module) and LAYERS[group(target)] >= LAYERS[group(module)]:
                wrong.append(
                    f"{module} (layer {LAYERS[group(module)]}) imports {target} "
                    f"(layer {LAYERS[group(target)]})"
                )
    return sorted(wrong)


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Import cycles, each as the path that closes it (depth-first search)."""
    state: dict[str, str] = {}
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for target in sorted(edges.get(node, ())):
            if state.get(target) == "open":
                cycles.append(path[path.index(target) :] + [target])
            elif target not in state:
                visit(target, [*path, target])
        state[node] = "done"

    for start in sorted(edges):
        if start not in state:
            visit(start, [start])
    return cycles


def test_imports_point_down_the_layers() -> None:
    wrong = upward_imports(graph())
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles() -> None:
    cycles = find_cycles(graph())
    assert not cycles, "\n".join(" -> ".join(cycle) for cycle in cycles)


def test_the_checks_catch_a_cycle_and_an_upward_import(tmp_path: Path) -> None:
    trainer, runner = f"{PACKAGE}.training.loop.trainer", f"{PACKAGE}.runs.runner"
    # A function-level import is read like a top-level one.
    source = tmp_path / "trainer.py"
    source.write_text(f"def f():\n    from {runner} import E2ESAETrainingRunner\n")
    edges = {trainer: imported_modules(source, set(module_names())), runner: {trainer}}
    assert edges[trainer] == {runner}
    assert upward_imports(edges) == [f"{trainer} (layer 2) imports {runner} (layer 3)"]
    assert find_cycles(edges) == [[runner, trainer, runner]]
    assert upward_imports({trainer: {PACKAGE}}) == [
        f"{trainer} imports the package facade; import the module itself"
    ]


@pytest.mark.parametrize("module", sorted(module_names()))
def test_modules_stay_small(module: str) -> None:
    lines = len(module_names()[module].read_text().splitlines())
    assert lines <= MAX_MODULE_LINES, f"{module} has {lines} lines; split it by concern"
