"""The package's shape, checked: no import cycle between lesionlab's modules (lazy imports inside functions
count), no module over MAX_LINES, at least MIN_SUBPACKAGES subpackages. Exit 1 with the reasons otherwise.

usage: python tools/check_architecture.py [SRC_DIR]   (default: src next to this file's folder)
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = "lesionlab"
MAX_LINES = 400
MIN_SUBPACKAGES = 5


def modules(src: Path) -> dict[str, Path]:
    out = {}
    for p in sorted((src / PACKAGE).rglob("*.py")):
        name = ".".join(p.relative_to(src).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = p
    return out


def imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """Modules of the package that ``name`` imports anywhere in its body (a package's __init__ counts only
    when it is not an ancestor of ``name``: importing lesionlab.x.y runs lesionlab.x's __init__ first anyway)."""
    base = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parts = base.split(".")[: len(base.split(".")) - node.level + 1]
                target = ".".join(parts + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found = [target] + [f"{target}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            found = [a.name for a in node.names]
        else:
            continue
        out.update(t for t in found if t in mods and t != name and not name.startswith(t + "."))
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in graph:
        if v not in index:
            visit(v)
    return found


def problems(src: Path) -> list[str]:
    mods = modules(src)
    graph = {m: imports(m, p, mods) for m, p in mods.items()}
    out = [f"import cycle: {' <-> '.join(c)}" for c in cycles(graph)]
    for path in mods.values():
        n = len(path.read_text().splitlines())
        if n > MAX_LINES:
            out.append(f"{path}: {n} lines (more than {MAX_LINES}: usually two concepts, split it)")
    subpackages = [m for m, p in mods.items() if p.name == "__init__.py" and m != PACKAGE]
    if len(subpackages) < MIN_SUBPACKAGES:
        out.append(f"only {len(subpackages)} subpackages ({', '.join(subpackages)}); want >= {MIN_SUBPACKAGES}")
    return out


def main(argv: list[str]) -> int:
    src = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parents[1] / "src"
    found = problems(src)
    for line in found:
        print(line)
    n = len(modules(src))
    print(f"{n} modules: " + ("OK" if not found else f"{len(found)} problem(s)"))
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
