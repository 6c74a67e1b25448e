"""Each package's import graph, read from the source, and the cycles in it.

Counts every import, the ones inside functions too (a lazy import that points back up
is still a cycle in the design, only hidden from the interpreter). An import of a
submodule is an edge to that module, not to the packages above it.

    python scripts/module_graph.py                 # all three packages: modules, edges, cycles
    python scripts/module_graph.py jarvis_prime --edges
    python scripts/module_graph.py reactor_core --folders

The layer test (packages/jarvis/tests/test_layers.py) runs the same functions and fails
on any cycle.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {
    "jarvis": ROOT / "packages/jarvis/src/jarvis",
    "jarvis_prime": ROOT / "packages/jarvis-prime/src/jarvis_prime",
    "reactor_core": ROOT / "packages/reactor-core/src/reactor_core",
}


def module_name(path: Path, package_dir: Path) -> str:
    parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_names(tree: ast.Module, module: str, is_package: bool) -> list[tuple[str, int]]:
    """Every (dotted name, line) the module imports, relative imports resolved, `from a import b` as `a.b`."""
    base = module.split(".") if is_package else module.split(".")[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[: len(base) - (node.level - 1)]
                prefix = ".".join(anchor + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            found += [(f"{prefix}.{alias.name}", node.lineno) for alias in node.names]
    return found


def module_graph(package: str) -> dict[str, dict[str, int]]:
    """module -> {imported module of the same package: first line}."""
    package_dir = SOURCES[package]
    paths = {module_name(p, package_dir): p for p in sorted(package_dir.rglob("*.py"))}
    graph: dict[str, dict[str, int]] = {}
    for module, path in paths.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        edges: dict[str, int] = {}
        for name, line in imported_names(tree, module, path.name == "__init__.py"):
            if name.split(".")[0] != package:
                continue
            # `from pkg import sub` names the module pkg.sub; `from pkg import func` (or *) names pkg
            target = name if name in paths else name.rsplit(".", 1)[0]
            if target in paths and target != module:
                edges.setdefault(target, line)
        graph[module] = edges
    return graph


def folder_graph(package: str) -> dict[str, dict[str, int]]:
    """The same graph with each module collapsed to its top-level folder (or top-level module)."""

    def folder(module: str) -> str:
        return ".".join(module.split(".")[:2])

    graph: dict[str, dict[str, int]] = {}
    for module, edges in module_graph(package).items():
        node = graph.setdefault(folder(module), {})
        for target, line in edges.items():
            if folder(target) != folder(module):
                node.setdefault(folder(target), line)
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, {}):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("packages", nargs="*", metavar="PACKAGE", help=f"any of {', '.join(SOURCES)} (default: all)")
    parser.add_argument("--edges", action="store_true", help="print every edge (module -> module:line)")
    parser.add_argument("--folders", action="store_true", help="collapse modules to their top-level folder")
    args = parser.parse_args()
    unknown = sorted(set(args.packages) - set(SOURCES))
    if unknown:
        parser.error(f"unknown package {', '.join(unknown)}; choose from {', '.join(SOURCES)}")
    status = 0
    for package in args.packages or SOURCES:
        graph = folder_graph(package) if args.folders else module_graph(package)
        found = cycles(graph)
        edges = sum(len(targets) for targets in graph.values())
        print(f"{package}: {len(graph)} {'folders' if args.folders else 'modules'}, {edges} edges, {len(found)} cycle(s)")
        if args.edges:
            for module in sorted(graph):
                for target, line in sorted(graph[module].items()):
                    print(f"  {module} -> {target}  (line {line})")
        for component in found:
            status = 1
            print(f"  cycle of {len(component)}: {', '.join(component)}")
            members = set(component)
            for module in component:
                for target, line in sorted(graph[module].items()):
                    if target in members:
                        print(f"    {module} -> {target}  (line {line})")
    return status


if __name__ == "__main__":
    sys.exit(main())
