"""The package's import structure (issue 20): layers import downwards only, no module imports another in a
circle, and no module is longer than :data:`MAX_LINES`.  Read from the source with ``ast``; nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "metacontrast"
PACKAGE = PACKAGE_DIR.name
#: the training core: none of its modules may import a package of these
LOWER = ("engines", "losses", "nets", "data")
UPPER = ("workflows", "reporting", "export")
MAX_LINES = 450


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _resolve(module: str, node: ast.ImportFrom) -> str:
    """The absolute module a ``from`` import names (relative imports resolved against ``module``)."""
    if not node.level:
        return node.module or ""
    base = module.split(".") if _is_package(module) else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str) -> set[str]:
    """The package modules ``module`` imports (anywhere in its source), and for an import of ``a.b.c`` from
    outside ``a.b`` also the packages ``a.b`` whose ``__init__`` the import runs."""
    tree = ast.parse(MODULES[module].read_text(), filename=str(MODULES[module]))
    named: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            named.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, node)
            named.add(target)
            named.update(f"{target}.{alias.name}" for alias in node.names if f"{target}.{alias.name}" in MODULES)
    edges = set()
    for name in named:
        if name.split(".")[0] != PACKAGE:
            continue
        parts = name.split(".")
        while parts and ".".join(parts) not in MODULES:
            parts.pop()  # ``from pkg.mod import Class``: the module is pkg.mod
        for end in range(2, len(parts) + 1):  # the packages on the way, unless module lives inside them
            target = ".".join(parts[:end])
            if target != module and not (module + ".").startswith(target + ".") and target != PACKAGE:
                edges.add(target)
    return edges


GRAPH = {module: _imports(module) for module in MODULES}


def test_the_training_core_imports_no_upper_layer():
    bad = [
        f"{module} imports {target}"
        for module, targets in GRAPH.items()
        if module.split(".")[1:2] and module.split(".")[1] in LOWER
        for target in targets
        if target.split(".")[1:2] and target.split(".")[1] in UPPER
    ]
    assert not bad, "engines/losses/nets/data must not import workflows/reporting/export:\n" + "\n".join(bad)


def test_no_import_cycle():
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(GRAPH.get(module, ())):
            if state.get(target) == 1:
                cycles.append(path[path.index(target):] + [target])
            elif target in GRAPH and not state.get(target):
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(GRAPH):
        if not state.get(module):
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_no_module_is_too_long():
    long = {m: len(p.read_text().splitlines()) for m, p in MODULES.items()}
    over = {m: n for m, n in long.items() if n > MAX_LINES}
    assert not over, f"modules over {MAX_LINES} lines: {over}"


def test_the_checks_see_the_package():
    """The walk finds the layers and their edges (so the tests above cannot pass on an empty graph)."""
    assert {"metacontrast.engines.distributed", "metacontrast.tracking.run", "metacontrast.reporting.grid"} <= set(GRAPH)
    assert "metacontrast.tracking" in GRAPH["metacontrast.workflows.finetune"]
    assert "metacontrast.ranks" in GRAPH["metacontrast.engines.distributed"]
