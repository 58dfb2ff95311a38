"""The house stays layered: imports point down, no module imports a higher layer (not even
lazily inside a function), and there is no import circle anywhere in ``src/netmeld``.

Every ``import`` statement of every module counts, wherever it stands, except those under
``if TYPE_CHECKING:`` (never executed). See "How the code is organised" in the README.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGE = SRC / "netmeld"

# Lowest first. A module's layer is that of the longest prefix listed here.
LAYERS: dict[str, int] = {
    "netmeld.errors": 0,
    "netmeld._version": 0,
    "netmeld._atomic": 0,
    "netmeld._outputs": 0,
    "netmeld._progress": 0,
    "netmeld.ops": 0,
    "netmeld.data": 0,
    "netmeld.engine": 0,
    "netmeld.runtime": 0,
    "netmeld.zoo": 0,
    "netmeld.io": 1,
    "netmeld.members": 2,
    "netmeld.model": 3,
    "netmeld.methods": 4,
    "netmeld.evaluate": 4,
    "netmeld.html_report": 4,
    "netmeld.predict": 4,
    "netmeld.cli": 5,
    "netmeld.demo": 5,
    "netmeld._deprecated": 5,
    "netmeld.__main__": 6,
    "netmeld": 6,  # the package itself: the public front door
}
NAMES = {0: "basics", 1: "io", 2: "members", 3: "model", 4: "methods", 5: "front doors", 6: "api"}


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(SRC).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = path
    return mods


MODULES = _modules()


def layer_of(module: str) -> int:
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS[best]


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(sub) for stmt in node.body for sub in ast.walk(stmt))
    return skip


def _target(name: str) -> str | None:
    """The most specific module of ours that ``name`` refers to."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str) -> set[str]:
    """Every module of ours that ``module`` imports, lazily or not."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = _type_checking_nodes(tree)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*parts, base] if base else parts)
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        for name in names:
            target = _target(name)
            if target and target != module and target.startswith("netmeld"):
                found.add(target)
    return found


GRAPH = {m: imports_of(m) for m in MODULES}


def test_the_layer_table_covers_every_module():
    for module in MODULES:
        assert any(module == p or module.startswith(p + ".") for p in LAYERS), module


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_imports_a_higher_layer(module):
    up = sorted(t for t in GRAPH[module] if layer_of(t) > layer_of(module))
    assert not up, (
        f"{module} ({NAMES[layer_of(module)]}) imports {up[0]} "
        f"({NAMES[layer_of(up[0])]}), a higher layer"
    )


def _circles() -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = []
            while True:
                w = stack.pop()
                on.discard(w)
                scc.append(w)
                if w == v:
                    break
            if len(scc) > 1:
                out.append(sorted(scc))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    return out


def test_no_import_circle():
    assert _circles() == []


def test_the_checker_sees_lazy_imports_and_circles(tmp_path):
    """The checks above can fail: a lazy import inside a function counts."""
    source = "def f():\n    from netmeld.cli import main\n"
    tree = ast.parse(source)
    lazy = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert lazy and _target(lazy[0].module or "") == "netmeld.cli"
    assert layer_of("netmeld.cli") > layer_of("netmeld.model.combined")
    assert layer_of("netmeld.methods.fusion.nets") == LAYERS["netmeld.methods"]
