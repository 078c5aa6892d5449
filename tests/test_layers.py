"""The import layers (README, "Architecture"): no import circle, and no import from a lower layer to a higher one
(so medcritical/ imports export/ only from the entry points). Every import statement counts, lazy ones too."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _modules() -> dict[str, tuple[Path, bool]]:
    """module name -> (file, is a package's __init__)."""
    found = {}
    for pkg in ("medcritical", "export"):
        for path in (ROOT / pkg).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            is_pkg = parts[-1] == "__init__"
            found[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (``from a import b`` counts as a.b when b is a module)."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, (path, is_pkg) in mods.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    here = name.split(".") if is_pkg else name.split(".")[:-1]
                    base = ".".join(here[: len(here) - node.level + 1] + ([base] if base else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in mods:
                    target = target.rpartition(".")[0]
                if target and target != name and not name.startswith(target + "."):  # a package's own __init__
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles: strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_circle() -> None:
    assert cycles(import_graph()) == []


# The README's picture, top to bottom; a module not named here is a library (layer 1).
ENTRY_POINTS = {"medcritical.cli", "medcritical.pipeline", "medcritical.__main__"}
STAGES = {f"medcritical.{m}" for m in "teach teachers sft rounds selfplay dpo evaluate report".split()}
GROUND = {"medcritical"} | {
    f"medcritical.{m}" for m in "errors artifacts steps layout recipe runtime stages default_model".split()
}


def layer(module: str) -> int:
    if module in ENTRY_POINTS:
        return 4
    if module.startswith("export"):
        return 3
    if module in STAGES:
        return 2
    return 0 if module in GROUND else 1


def test_imports_only_point_down() -> None:
    graph = import_graph()
    climbing = sorted((m, t) for m, ts in graph.items() for t in ts if layer(t) > layer(m))
    assert climbing == []


def test_the_checker_sees_a_circle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
