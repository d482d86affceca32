"""The package's layout: rooms by concern, imports that only run one way.

Read from the source with `ast`, nothing imported: every `from . import` and `import
keymeai...` counts, at module level or inside a function, except those under `if
TYPE_CHECKING:` (a type named in an annotation is not a dependency at run time).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "keymeai"

# The rooms, and the modules that stay at the top because every room uses them.
ROOMS = ("api", "ledger", "operator", "ops")
TOP = {"__init__", "catalogue", "config", "errors", "gateway", "tables", "tokens"}
# A room never imports from the rooms listed against it: the ledger knows nothing of
# requests or pages, and the request path nothing of the operator's surfaces.
NEVER = {"ledger": ("api", "operator"), "api": ("operator",), "ops": ("operator",)}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


class Imports(ast.NodeVisitor):
    """The keymeai modules one module imports, and where (line, inside a function)."""

    def __init__(self, name: str, is_package: bool) -> None:
        self.package = name.split(".") if is_package else name.split(".")[:-1]
        self.found: list[tuple[str, int, bool]] = []
        self.depth = 0

    def visit_If(self, node: ast.If) -> None:
        if "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                self.visit(child)
            return
        self.generic_visit(node)

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            base = self.package[: len(self.package) - node.level + 1]
            source = ".".join(base + ([node.module] if node.module else []))
        else:
            source = node.module or ""
        for alias in node.names:
            target = f"{source}.{alias.name}"
            self._add(target if target in MODULES else source, node.lineno)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node.lineno)

    def _add(self, target: str, line: int) -> None:
        if target in MODULES and target != "keymeai":
            self.found.append((target, line, self.depth > 0))


def imports_of(name: str) -> list[tuple[str, int, bool]]:
    path = MODULES[name]
    visitor = Imports(name, path.name == "__init__.py")
    visitor.visit(ast.parse(path.read_text(), str(path)))
    return visitor.found


GRAPH = {name: {target for target, _, _ in imports_of(name)} for name in MODULES}


def room(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 2 else ""


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_every_module_sits_in_its_room() -> None:
    strays = [
        name
        for name, path in MODULES.items()
        if name.count(".") == 1 and path.stem not in TOP and name.split(".")[1] not in ROOMS
    ]
    assert not strays, f"modules outside the rooms {ROOMS}: {strays}"


def test_no_import_cycle() -> None:
    # A package's own __init__ may import its modules; they never import it back.
    graph = {
        name: {t for t in targets if not name.startswith(t + ".")}
        for name, targets in GRAPH.items()
    }
    assert cycles(graph) == []


@pytest.mark.parametrize("source", sorted(NEVER))
def test_rooms_import_one_way(source: str) -> None:
    wrong = [
        f"{name} imports {target}"
        for name, targets in GRAPH.items()
        if room(name) == source
        for target in sorted(targets)
        if room(target) in NEVER[source]
    ]
    assert not wrong


def test_no_import_inside_a_function() -> None:
    """Imports that dodge a cycle hide it; only the app factory imports late, so that a
    gevent worker patches the standard library first (see `keymeai.create_app`)."""
    late = [
        f"{MODULES[name].relative_to(PACKAGE.parent)}:{line} imports {target}"
        for name in MODULES
        if name != "keymeai"
        for target, line, inside in imports_of(name)
        if inside
    ]
    assert not late


def test_the_checks_see_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert GRAPH["keymeai.api.serve"] >= {"keymeai.gateway", "keymeai.ledger.quota"}
