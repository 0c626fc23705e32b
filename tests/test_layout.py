"""The tree shows the data flow: folders by stage, imports pointing one way, no cycles.

The import graph is read from the source (ast): nothing is imported.
"""

import ast
from pathlib import Path

from conftest import REPO

# Stages in the order data flows; a module may import its own stage and earlier ones only.
STAGES = ["base", "storage", "config", "outputs", "sources", "model", "raykit", "commands", "cli"]
BASE = {"hcdlib.errors", "hcdlib.console"}
CLI = {"hcdlib", "hcdlib.cli", "hcdlib.cli_doc"}  # the package's own API (load_model, read_predictions) too


def _modules() -> dict[str, Path]:
    out = {}
    for root in ("hcdlib", "benchmarks"):
        for path in (REPO / root).rglob("*.py"):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports, at the top or inside functions."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
            for t in targets:
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t and t != name and not name.startswith(t + "."):  # a package's own __init__ is no edge
                    graph[name].add(t)
    return graph


def stage(module: str) -> str:
    if module in BASE:
        return "base"
    if module in CLI:
        return "cli"
    if module == "hcdlib.config":
        return "config"
    if module.startswith("benchmarks"):
        return "benchmarks"
    return module.split(".")[1]


def test_no_import_cycles():
    graph, seen, path = import_graph(), set(), []

    def visit(m: str) -> None:
        if m in path:
            raise AssertionError("import cycle: " + " -> ".join([*path[path.index(m):], m]))
        if m in seen:
            return
        path.append(m)
        for n in sorted(graph[m]):
            visit(n)
        path.pop()
        seen.add(m)

    for m in sorted(graph):
        visit(m)


def test_imports_point_one_way_along_the_data_flow():
    wrong = []
    for m, targets in import_graph().items():
        if stage(m) == "benchmarks":
            continue
        for t in targets:
            if stage(t) == "benchmarks" or STAGES.index(stage(t)) > STAGES.index(stage(m)):
                wrong.append(f"{m} ({stage(m)}) imports {t} ({stage(t)})")
    assert not wrong, "\n".join(wrong)


def test_modules_and_functions_stay_short_enough_to_read():
    """No module over 300 lines and no function over 60: each reads top to bottom in one sitting."""
    long = []
    for name, path in _modules().items():
        src = path.read_text()
        if len(src.splitlines()) > 300:
            long.append(f"{name}: {len(src.splitlines())} lines")
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                long.append(f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert not long, long
