"""The import rules of lrkd/: layers point one way, and nothing imports in a circle.

Every ``import``/``from ... import`` of an lrkd module, at the top of a file or inside a
function, is an edge of the graph; an edge may point to the same layer or a lower one, never a
higher one, and the graph has no cycle. So no import can be hidden in a function to dodge a
cycle: a downward import never closes one. docs/index.md draws the same layers.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "lrkd"

#: Lowest first. A module belongs to the layer of the longest prefix that names it.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("lrkd", "lrkd._compat", "lrkd.seeds", "lrkd.losses", "lrkd.env", "lrkd.errors"),
    ("lrkd.models",),
    ("lrkd.distributed", "lrkd.checkpointing"),
    ("lrkd.data",),
    ("lrkd.generation",),
    ("lrkd.objective", "lrkd.assembly", "lrkd.diagnostics", "lrkd.evaluation"),
    ("lrkd.callbacks", "lrkd.preflight"),
    ("lrkd.module",),
    ("lrkd.export",),
    ("lrkd.cli", "lrkd.evaluation.command"),
)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _type_checking_only(tree: ast.AST) -> set[int]:
    """The nodes inside ``if TYPE_CHECKING:`` blocks (never executed)."""
    inside: set[int] = set()
    for node in ast.walk(tree):
        test = node.test if isinstance(node, ast.If) else None
        name = getattr(test, "id", None) or getattr(test, "attr", None)
        if name == "TYPE_CHECKING":
            inside |= {id(n) for child in node.body for n in ast.walk(child)}
    return inside


def imports(path: Path, known: set[str], runtime_only: bool = False) -> list[tuple[str, int, bool]]:
    """(imported lrkd module, line, inside a function) for every import in ``path`` (with
    ``runtime_only``, not those under ``if TYPE_CHECKING:``)."""
    tree = ast.parse(path.read_text())
    nested: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            nested |= {id(n) for n in ast.walk(node) if n is not node}
    skipped = _type_checking_only(tree) if runtime_only else set()
    out = []
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            targets = [node.module]
            targets += [f"{node.module}.{alias.name}" for alias in node.names]
        for target in targets:
            if target in known and id(node) not in skipped:
                out.append((target, node.lineno, id(node) in nested))
    return out


def layer(name: str) -> int:
    best, rank = -1, None
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            matches = name == prefix or name.startswith(prefix + ".")
            if matches and len(prefix) > best:
                best, rank = len(prefix), index
    assert rank is not None, f"{name} is in no layer: add it to LAYERS"
    return rank


def graph() -> dict[str, set[str]]:
    """The runtime import graph (type-checking-only imports cannot form an import cycle)."""
    known = modules()
    return {
        name: {t for t, _, _ in imports(path, set(known), runtime_only=True) if t != name}
        for name, path in known.items()
    }


def test_every_module_has_a_layer() -> None:
    for name in modules():
        layer(name)


def test_imports_point_to_the_same_or_a_lower_layer() -> None:
    known = modules()
    back = []
    for name, path in known.items():
        for target, line, in_function in imports(path, set(known)):
            if layer(target) > layer(name):
                where = " (inside a function)" if in_function else ""
                back.append(f"{path.relative_to(ROOT.parent)}:{line}: {name} -> {target}{where}")
    assert not back, "imports against the layers:\n" + "\n".join(back)


def test_no_import_cycle() -> None:
    edges = graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in edges[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in edges:
        if node not in index:
            visit(node)
    assert not cycles, f"import cycles: {cycles}"


def test_the_rules_catch_a_back_arrow(tmp_path) -> None:
    """The checker itself: a models module importing data is reported."""
    fake = tmp_path / "x.py"
    fake.write_text("def f():\n    from lrkd.data.corpus import builtin_corpus\n")
    found = imports(fake, {"lrkd.data.corpus"})
    assert found == [("lrkd.data.corpus", 2, True)]
    assert layer("lrkd.data.corpus") > layer("lrkd.models.lowrank")
