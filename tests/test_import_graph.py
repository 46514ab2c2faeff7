"""The package's import graph, built from the source: no cycles, and no op imports a benchmark.

Every `import` and `from ... import` counts, function-local ones included (a lazy import
still ties the two modules together). The folders are mapped onto the import root as
pyproject.toml maps them (`moelab.costmodel` is `costmodel/`, and so on).
"""

from __future__ import annotations

import ast
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def package_dirs() -> dict[str, Path]:
    """Import name -> folder, read from pyproject.toml's package-dir (the one source)."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return {name: ROOT / folder for name, folder in config["tool"]["setuptools"]["package-dir"].items()}


def modules() -> dict[str, Path]:
    """Every module of the package: dotted name -> file."""
    found = {}
    for package, folder in package_dirs().items():
        for path in folder.glob("*.py"):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            found[name] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports (anywhere in its body)."""
    mods = modules()
    graph: dict[str, set[str]] = {name: set() for name in mods}
    for name, path in mods.items():
        package = name if path.stem == "__init__" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: resolve against this module's package
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
                # `from a.b import c`: the module a.b.c if it is one, else a.b itself
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in mods else base
                           for alias in node.names]
            for target in targets:
                while target and target not in mods:  # `import a.b.c` of a name inside a.b
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path [a, b, ..., a], or None (iterative DFS, white/grey/black)."""
    state = dict.fromkeys(graph, 0)  # 0 unseen, 1 on the current path, 2 done
    for start in sorted(graph):
        if state[start]:
            continue
        path, stack = [], [(start, iter(sorted(graph[start])))]
        state[start] = 1
        path.append(start)
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                state[node] = 2
                stack.pop()
                path.pop()
            elif state[child] == 1:
                return path[path.index(child):] + [child]
            elif state[child] == 0:
                state[child] = 1
                path.append(child)
                stack.append((child, iter(sorted(graph[child]))))
    return None


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for child in graph[todo.pop()]:
            if child not in seen:
                seen.add(child)
                todo.append(child)
    return seen


def is_benchmark(module: str) -> bool:
    leaf = module.rpartition(".")[2]
    return leaf.startswith("bench_") or leaf in ("autotune", "timing")


def test_graph_covers_every_folder():
    mods = modules()
    for package in package_dirs():
        assert package in mods, f"{package} has no __init__.py"
    assert "moelab.kernels.dispatch" in mods and "moelab.costmodel.closed_form" in mods
    assert "moelab.commands.gamma" in mods


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_op_or_model_module_reaches_a_benchmark():
    """Benchmarks and the autotuner are tools that import the ops, never the other way."""
    graph = import_graph()
    for module in graph:
        if is_benchmark(module) or module.startswith("moelab.commands") or module == "moelab.cli":
            continue
        reached = sorted(m for m in reachable(graph, module) if is_benchmark(m))
        assert not reached, f"{module} imports benchmark code: {', '.join(reached)}"


def test_layers_point_one_way():
    """costmodel imports nothing above it; kernels and experiments never import the CLI."""
    graph = import_graph()
    for module, targets in graph.items():
        if module.startswith("moelab.costmodel"):
            bad = [t for t in targets if not t.startswith("moelab.costmodel")]
            assert not bad, f"{module} (cost model) imports {bad}"
        if module.startswith(("moelab.kernels", "moelab.experiments", "moelab.costmodel")):
            bad = [t for t in targets if t.startswith("moelab.commands") or t == "moelab.cli"]
            assert not bad, f"{module} imports the CLI: {bad}"


def test_cycle_finder_finds_a_planted_cycle():
    """The checker itself: a graph with a cycle is caught, one without is not."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
