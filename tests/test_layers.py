"""The package's shape (issue 12): imports point down the layers, no module imports
itself back through others, and no module keeps mutable state at module level.

Read from the source with ``ast`` (imports inside functions count too: a lazy
import is still a dependency)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "tessera"

#: Top to bottom; a module may import its own layer and the ones below it.
LAYERS = ["cli", "launch", "train", "api", "cluster", "models", "parallel", "ps", "amp",
          "profiler", "data", "transport", "config", "errors"]
#: Top-level modules of the package, by layer.
API_MODULES = {"__init__", "api", "factory", "nn", "pipeline"}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        parts = path.relative_to(PKG.parent).with_suffix("").parts
        name = ".".join(p for p in parts if p != "__init__") if parts[-1] == "__init__" \
            else ".".join(parts)
        out[name] = path
    return out


def _layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "api"
    head = parts[1]
    if head in API_MODULES:
        return "api"
    return head


def _imports(path: Path, module: str) -> list[tuple[str, bool]]:
    """(imported tessera module, at module level?) for every import in ``path``."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    for node in ast.walk(tree):  # imports under `if TYPE_CHECKING:` are not dependencies
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for sub in ast.walk(node):
                setattr(sub, "_typing_only", True)
    out = []
    for node in ast.walk(tree):
        if getattr(node, "_typing_only", False):
            continue
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            if name == "tessera" or name.startswith("tessera."):
                out.append((name, id(node) in top))
    return out


def test_imports_point_down_the_layers():
    mods = _modules()
    upward = []
    for module, path in mods.items():
        mine = LAYERS.index(_layer(module))
        for name, _ in _imports(path, module):
            if name not in mods:
                continue  # `from tessera.x import name`: the module itself is listed too
            theirs = LAYERS.index(_layer(name))
            if theirs < mine:
                upward.append(f"{module} ({LAYERS[mine]}) imports {name} ({LAYERS[theirs]})")
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    mods = _modules()
    graph = {m: {n for n, _ in _imports(p, m) if n in mods and n != m} for m, p in mods.items()}
    # A package's __init__ is not a dependency of its own modules (Python imports it first).
    graph = {m: {n for n in deps if not m.startswith(n + ".")} for m, deps in graph.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [node, nxt])
                              if nxt in stack else f"{node} -> {nxt}")
            elif nxt not in state:
                visit(nxt, stack + [node])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    assert not cycles, "\n".join(cycles)


def _mutable_globals(path: Path) -> list[str]:
    """Module-level names bound to a mutable value (other than UPPER_CASE constant
    tables), or rebound with ``global``."""
    tree = ast.parse(path.read_text())
    found = []
    for node in tree.body:
        targets, value = [], None
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets, value = [node.target], node.value
        mutable = isinstance(value, (ast.List, ast.Dict, ast.Set, ast.ListComp, ast.DictComp,
                                     ast.SetComp)) or (
            isinstance(value, ast.Call) and ast.unparse(value.func) in
            ("list", "dict", "set", "collections.defaultdict", "defaultdict", "OrderedDict"))
        for t in targets:
            # Constants by convention (UPPER_CASE, __all__) are tables nobody rebinds.
            if mutable and isinstance(t, ast.Name) and not (
                    t.id.lstrip("_").isupper() or t.id == "__all__"):
                found.append(f"{t.id} (line {node.lineno})")
    for node in ast.walk(tree):
        if isinstance(node, ast.Global):
            found.append(f"global {', '.join(node.names)} (line {node.lineno})")
    return found


@pytest.mark.parametrize("module", sorted(_modules()))
def test_no_module_level_mutable_state(module):
    assert not _mutable_globals(_modules()[module])
