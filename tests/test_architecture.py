"""The house rules of the code base: no import cycles between the engine's modules (counting imports inside
functions too), the engine never imports Streamlit, and every stage folder is a package."""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
CORE = ROOT / "xaicomp_core"
STAGES = ("relevance", "compress", "evaluate", "format", "io", "viz", "report", "cli")


def module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the xaicomp_core modules it imports (anywhere in the file, resolved to existing modules)."""
    files = {module_name(p): p for p in CORE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                if node.level:
                    base = mod.split(".")[: -node.level] if path.name != "__init__.py" else mod.split(".")[
                        : len(mod.split(".")) - node.level + 1]
                    names = [".".join([*base, node.module])]
                else:
                    names = [node.module]
                names += [f"{names[0]}.{a.name}" for a in node.names]
            for n in names:
                if n.startswith("xaicomp_core"):
                    while n not in files and "." in n:
                        n = n.rsplit(".", 1)[0]
                    if n in files and n != mod:
                        deps.add(n)
        graph[mod] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    graph = import_graph()
    # package __init__ files re-export their stage; an __init__ importing its own children is not a cycle
    for mod in graph:
        if (CORE / mod.removeprefix("xaicomp_core").lstrip(".").replace(".", "/") / "__init__.py").exists():
            graph[mod] = {d for d in graph[mod] if not d.startswith(mod + ".")}
    found = cycles(graph)
    assert not found, f"import cycles: {found}"


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_engine_never_imports_streamlit():
    for path in CORE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(m.split(".")[0] == "streamlit" for m in mods), path


def test_stage_folders_are_packages():
    for stage in STAGES:
        assert (CORE / stage / "__init__.py").exists(), stage
