"""The package map of the README's Architecture section, checked by walking imports.

Rules: no import cycles between the packages (and top-level modules) of ``gateway``;
``dimse`` and ``web`` (the fronts) are imported only by ``daemon`` and ``cli``;
``upstream`` never imports ``spool``; ``codecs`` and ``model`` import nothing of ours
beyond themselves and the leaf modules named below, which import nothing of ours at
all; and no import cycles between the modules of ``retrieval`` (the engine the fronts
share, whose parts each run on their own). Every import counts, including ones inside
functions and under ``TYPE_CHECKING``.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

GATEWAY = Path(__file__).resolve().parents[1] / "gateway"
FRONTS = {"dimse", "web"}
WIRING = {"daemon", "cli", "__main__"}
LEAVES = {"uids", "part10"}  # small pure helpers anything may use


def unit_of(module: str) -> str | None:
    """The package (or top-level module) a dotted ``gateway.x.y`` name belongs to."""
    parts = module.split(".")
    if parts[0] != "gateway" or len(parts) < 2:
        return None
    return parts[1]


def module_name(path: Path) -> str:
    """The dotted name of a module file under ``gateway`` (a package for __init__.py)."""
    module = ".".join(path.relative_to(GATEWAY.parent).with_suffix("").parts)
    return module[: -len(".__init__")] if module.endswith(".__init__") else module


def imported_names(path: Path) -> list[str]:
    """Every dotted name a module file imports, relative imports resolved; for
    ``from a import b`` both ``a`` and ``a.b`` (b may be a module or a name in a)."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names += [base] + [f"{base}.{a.name}" for a in node.names]
    return names


def imports() -> dict[str, set[str]]:
    """unit -> units it imports (other than itself)."""
    edges: dict[str, set[str]] = defaultdict(set)
    for path in GATEWAY.rglob("*.py"):
        source = unit_of(module_name(path)) or "gateway"
        for name in imported_names(path):
            target = unit_of(name)
            if target and target != source and (GATEWAY / target).exists() or (
                target and target != source and (GATEWAY / f"{target}.py").exists()
            ):
                edges[source].add(target)
    return edges


def module_imports(package: str) -> dict[str, set[str]]:
    """module -> modules of ``gateway.<package>`` it imports (other than itself). Importing
    a module of the package runs the package's __init__ first, so that counts too."""
    root = GATEWAY / package
    modules = {module_name(path) for path in root.glob("*.py")}
    init = f"gateway.{package}"
    edges: dict[str, set[str]] = defaultdict(set)
    for path in root.glob("*.py"):
        source = module_name(path)
        for name in imported_names(path):
            if name in modules and name != source:
                edges[source].add(name)
                if source != init:
                    edges[source].add(init)
    return edges


def cycles_in(edges: dict[str, set[str]]) -> list[str]:
    """Every import cycle in the graph, each written once from its smallest node."""
    cycles: set[tuple[str, ...]] = set()

    def visit(node: str, stack: list[str]) -> None:
        for nxt in sorted(edges.get(node, ())):
            if nxt in stack:
                loop = stack[stack.index(nxt) :]
                first = loop.index(min(loop))
                cycles.add(tuple(loop[first:] + loop[:first]))
            elif len(stack) < 12:
                visit(nxt, stack + [nxt])

    for start in sorted(edges):
        visit(start, [start])
    return [" -> ".join(c + c[:1]) for c in sorted(cycles)]


def test_no_cycles_between_packages() -> None:
    cycles = cycles_in(imports())
    assert not cycles, "import cycles: " + "; ".join(cycles)


def test_no_cycles_between_the_modules_of_retrieval() -> None:
    edges = module_imports("retrieval")
    assert "gateway.retrieval.engine" in edges  # the walk sees the package
    cycles = cycles_in(edges)
    assert not cycles, "import cycles: " + "; ".join(cycles)


def test_fronts_are_imported_only_by_the_wiring() -> None:
    edges = imports()
    offenders = sorted(f"{src} imports {dst}" for src, dsts in edges.items() for dst in dsts & FRONTS if src not in WIRING)
    assert not offenders, offenders


def test_upstream_does_not_import_spool() -> None:
    assert "spool" not in imports().get("upstream", set())


def test_codecs_and_model_stand_alone() -> None:
    edges = imports()
    assert edges.get("codecs", set()) <= LEAVES, edges.get("codecs")
    assert edges.get("model", set()) <= LEAVES, edges.get("model")


def test_leaves_import_nothing_of_ours() -> None:
    edges = imports()
    assert all(not edges.get(leaf) for leaf in LEAVES), {leaf: edges.get(leaf) for leaf in LEAVES}
