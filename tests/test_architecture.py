"""The package map of the README's Architecture section, checked by walking imports.

Rules: no import cycles between the packages (and top-level modules) of ``gateway``;
``dimse`` and ``web`` (the fronts) are imported only by ``daemon`` and ``cli``;
``upstream`` never imports ``spool``; ``codecs`` and ``model`` import nothing of ours
beyond themselves and the leaf modules named below. Every import counts, including
ones inside functions and under ``TYPE_CHECKING``.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

GATEWAY = Path(__file__).resolve().parents[1] / "gateway"
FRONTS = {"dimse", "web"}
WIRING = {"daemon", "cli", "__main__"}
LEAVES = {"uids"}  # small pure helpers anything may use


def unit_of(module: str) -> str | None:
    """The package (or top-level module) a dotted ``gateway.x.y`` name belongs to."""
    parts = module.split(".")
    if parts[0] != "gateway" or len(parts) < 2:
        return None
    return parts[1]


def imports() -> dict[str, set[str]]:
    """unit -> units it imports (other than itself)."""
    edges: dict[str, set[str]] = defaultdict(set)
    for path in GATEWAY.rglob("*.py"):
        rel = path.relative_to(GATEWAY.parent).with_suffix("")
        module = ".".join(rel.parts)
        if module.endswith(".__init__"):
            module = module[: -len(".__init__")]
        source = unit_of(module) or "gateway"
        package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            for name in names:
                target = unit_of(name)
                if target and target != source and (GATEWAY / target).exists() or (
                    target and target != source and (GATEWAY / f"{target}.py").exists()
                ):
                    edges[source].add(target)
    return edges


def test_no_cycles_between_packages() -> None:
    edges = imports()
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
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c + c[:1]) for c in sorted(cycles))


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
