#!/usr/bin/env python3
"""Checks the project's dependency graphs for cycles and prints each one.

    python3 scripts/check_cycles.py [REPO]      (exit 1 when there is a cycle)

Three graphs, each over the project's own files:
- Python imports: module A -> module B when A imports B anywhere (at the top
  or inside a function) in the llama2c package; __init__.py files, the
  package's public faces, are left out.
- C includes: file -> header for every `#include "..."` in csrc/.
- C calls: library file A -> B when A calls a function that only B defines
  (programs, the files with a main(), are left out: nothing calls them).
"""
from __future__ import annotations

import ast
import re
import sys
from pathlib import Path


def python_graph(repo: Path) -> dict[str, set[str]]:
    package = repo / "llama2c"
    modules = {}
    for path in package.rglob("*.py"):
        if path.name != "__init__.py":
            modules[".".join(path.relative_to(repo).with_suffix("").parts)] = path
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        parent = name.rsplit(".", 1)[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = parent.split(".")[: len(parent.split(".")) - node.level + 1]
                    base = ".".join(parts + [base] if base else parts)
                found.add(base)
                found.update(f"{base}.{alias.name}" for alias in node.names)
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def _code(path: Path) -> str:
    """C source without comments and string literals."""
    text = path.read_text(encoding="utf-8", errors="replace")
    return re.sub(r'/\*.*?\*/|//[^\n]*|"(?:\\.|[^"\\])*"', " ", text, flags=re.S)


def include_graph(csrc: Path) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in sorted(csrc.glob("*.[ch]")):
        text = path.read_text(encoding="utf-8", errors="replace")
        graph[path.name] = {h for h in re.findall(r'^\s*#\s*include\s+"([^"]+)"', text, re.M)
                            if (csrc / h).exists() and h != path.name}
    return graph


def call_graph(csrc: Path) -> dict[str, set[str]]:
    sources = {p.name: _code(p) for p in sorted(csrc.glob("*.c"))}
    library = {name: code for name, code in sources.items() if not re.search(r"\bint\s+main\s*\(", code)}
    definer: dict[str, list[str]] = {}
    for name, code in library.items():
        for fn in re.findall(r"^(?!\s*static\b)[A-Za-z_][\w \t*]*?\b([A-Za-z_]\w*)\s*\([^;{)]*\)\s*\{", code, re.M):
            definer.setdefault(fn, []).append(name)
    graph: dict[str, set[str]] = {}
    for name, code in library.items():
        called = set(re.findall(r"\b([A-Za-z_]\w*)\s*\(", code))
        graph[name] = {definer[fn][0] for fn in called
                       if fn in definer and len(definer[fn]) == 1 and definer[fn][0] != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (iterative Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
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
    return found


def main(argv: list[str]) -> int:
    repo = Path(argv[1] if len(argv) > 1 else Path(__file__).resolve().parent.parent)
    graphs = {"python import": python_graph(repo), "C include": include_graph(repo / "csrc"),
              "C call": call_graph(repo / "csrc")}
    total = 0
    for kind, graph in graphs.items():
        for component in cycles(graph):
            print(f"{kind} cycle: {' <-> '.join(component)}")
            total += 1
    print(f"cycles: {total} ({', '.join(f'{len(g)} {k} nodes' for k, g in graphs.items())})")
    return 1 if total else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
