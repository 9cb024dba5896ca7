"""No import cycles in either package, counting every import: at module level, inside functions (deferred) and
under TYPE_CHECKING. A cycle hidden by a deferred import still ties two modules together: neither can be read,
tested or moved without the other, and the layering (pyproject.toml's import-linter contract) cannot hold."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def import_graph(package: str, root: Path = ROOT) -> dict[str, set[str]]:
    """{module: modules of the package it imports}. `from pkg import name` counts as importing `pkg.name` when
    that is a module, else `pkg` itself; a submodule does not count as importing its parent package."""
    modules: dict[str, tuple[Path, bool]] = {}
    for path in (root / package).rglob("*.py"):
        parts = list(path.relative_to(root).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if is_package else parts)] = (path, is_package)

    def known(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, (path, is_package) in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = name.split(".")[: len(name.split(".")) - (0 if is_package else 1) - (node.level - 1)]
                    base = ".".join([*anchor, *([node.module] if node.module else [])])
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                           for alias in node.names]
            for target in targets:
                found = known(target)
                if found is not None and found != name:
                    graph[name].add(found)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)

    found = []
    for component in components:  # name one concrete cycle: walk inside the component back to its start
        start = min(component)
        path, seen = [start], {start}
        while True:
            nxt = min(n for n in graph[path[-1]] if n in component)
            if nxt in seen:
                found.append([*path[path.index(nxt):], nxt])
                break
            path.append(nxt)
            seen.add(nxt)
    return found


def test_deferred_and_type_checking_imports_count(tmp_path: Path) -> None:
    package = tmp_path / "p"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from p.sub import b\n")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "b.py").write_text("def f():\n    from ..c import g\n")
    (package / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import p.a\ng = 1\n")
    assert cycles(import_graph("p", tmp_path)) == [["p.a", "p.sub.b", "p.c", "p.a"]]


def test_no_import_cycle_in_the_server() -> None:
    assert cycles(import_graph("vllm_batch_server")) == []


@pytest.mark.xfail(strict=False, reason="the client's _async <-> _followup_client cycle is being removed separately "
                   "(issue 22, item 4: one client flow dialect); passes once that lands")
def test_no_import_cycle_in_the_client() -> None:
    assert cycles(import_graph("vllm_batch")) == []
