"""The folders stack like floors: every import of the project points down, none hides inside a function.

Floors, bottom up: ``lowbit`` (quantization math, formats, errors, model registry) <- ``kernels`` (the ops and
their backends) <- ``calib`` (calibration data) <- ``quant`` (quantized modules, optimisers, CLI) <- ``export``.
The one arrow up is the command line's: ``quant.run`` writes the exported checkpoint.
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FLOORS = ("lowbit", "kernels", "calib", "quant", "export")
UP_ALLOWED = {("quant/run.py", "export")}


def _sources():
    return sorted(p for pkg in FLOORS for p in (ROOT / pkg).rglob("*.py"))


def _imports(path: Path):
    """``(target package, module path, line, inside a function)`` of every import of a project package."""
    tree = ast.parse(path.read_text(), str(path))
    package = list(path.relative_to(ROOT).parent.parts)
    out = []

    def visit(node, in_fn):
        for child in ast.iter_child_nodes(node):
            fn = in_fn or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            names = []
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = ".".join(package[:len(package) - child.level + 1]) if child.level else ""
                module = ".".join(p for p in (base, child.module) if p)
                names = [f"{module}.{a.name}" for a in child.names]  # a module, or a name in one
            for name in names:
                top = name.split(".")[0]
                if top in FLOORS:
                    out.append((top, name, child.lineno, in_fn))
            visit(child, fn)
    visit(tree, False)
    return out


def test_sources_found():
    assert len(_sources()) > 40


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_down(path):
    rel = str(path.relative_to(ROOT))
    here = FLOORS.index(rel.split("/")[0])
    for top, name, line, in_fn in _imports(path):
        assert not in_fn, f"{rel}:{line} imports {name} inside a function; import it at the top of the module"
        if (rel, top) not in UP_ALLOWED:
            assert FLOORS.index(top) <= here, (f"{rel}:{line} imports {name}, a floor above {rel.split('/')[0]} "
                                               f"(floors bottom up: {' <- '.join(FLOORS)})")


def test_no_import_circles():
    """The module-level import graph of the project is acyclic."""
    graph = {}
    for path in _sources():
        mod = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        deps = set()
        for _, name, _, in_fn in _imports(path):
            if not in_fn:
                deps.add(name)
        graph[mod] = deps
    mods = set(graph)

    def resolve(name):  # "pkg.mod.Thing" or "pkg" -> the module it loads
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name

    edges = {m: {resolve(d) for d in ds} - {m, ""} for m, ds in graph.items()}
    assert sum(map(len, edges.values())) > 50  # the graph was read
    state, circles = {}, []

    def dfs(m, stack):
        state[m] = 1
        for d in sorted(edges.get(m, ())):
            if state.get(d) == 1:
                circles.append(" -> ".join((stack + [m])[(stack + [m]).index(d):] + [d]))
            elif d not in state:
                dfs(d, stack + [m])
        state[m] = 2
    for m in sorted(edges):
        if m not in state:
            dfs(m, [])
    assert not circles, "import circles: " + "; ".join(circles)
