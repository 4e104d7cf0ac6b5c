"""An import graph of a source tree, read with ``ast`` (nothing is imported), and its checks.

What counts as an import, and why:

* **Cycles** (between modules, between packages) count every import that can run:
  at module level, in class bodies, in ``try``/``if`` blocks and inside functions. A lazy
  import inside a function is the usual way to dodge a cycle, not to remove it: the
  issue's own example (``models/default.py`` <-> ``models/train.py``) was one, and the fix
  was to move the code that needed it. Imports under ``if TYPE_CHECKING:`` never run and
  do not count.
* **Room rules** count every import, ``TYPE_CHECKING`` ones included: a type from a
  forbidden room still ties the code to it.
* ``from package import name`` is an import of ``package.name`` when that is a module, else
  of ``package``. Imports the loader does at run time (``importlib.import_module``, as
  ``service.engine.methods`` does for its plug-ins) are invisible to ``ast``.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Room:
    """What the modules of ``package`` may not import, and why.

    Attributes:
        package: dotted name; the rule holds for it and everything below it.
        forbidden: dotted prefixes it may not import.
        why: the room's job, said in the failure.
        only: when given, it may import nothing but the standard library, itself and
            these prefixes (``forbidden`` still applies).
    """

    package: str
    forbidden: tuple[str, ...]
    why: str
    only: tuple[str, ...] | None = None

    def allows(self, target: str) -> bool:
        if within(target, self.forbidden):
            return False
        if self.only is None:
            return True
        top = target.partition(".")[0]
        return top in STDLIB or within(target, (self.package, *self.only))


STDLIB = frozenset(sys.stdlib_module_names) | {"__future__"}


@dataclass(frozen=True)
class Import:
    """One imported name, resolved to the deepest module of the tree it names."""

    target: str  # dotted; a module of the tree, or the name as written for anything else
    type_only: bool  # under ``if TYPE_CHECKING:``
    line: int


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def collect_modules(root: Path, tops: Iterable[str], skip: Iterable[str] = ()) -> dict[str, Path]:
    """``{dotted name: file}`` of every ``.py`` under ``root/<top>``, ``skip`` folders left out."""
    skipped = [root / s for s in skip]
    found = {}
    for top in tops:
        for path in sorted((root / top).rglob("*.py")):
            if not any(path.is_relative_to(s) for s in skipped):
                found[module_name(path, root)] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(name: str, path: Path, known: Iterable[str]) -> list[Import]:
    """Every import statement of the module ``name`` at ``path``."""
    known = set(known)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[Import] = []

    def resolve(dotted: str) -> str:
        probe = dotted
        while probe and probe not in known:
            probe = probe.rpartition(".")[0]
        return probe or dotted

    def visit(node: ast.AST, type_only: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                for stmt in child.body:
                    visit_one(stmt, True)
                for stmt in child.orelse:
                    visit_one(stmt, type_only)
                continue
            visit_one(child, type_only)

    def visit_one(node: ast.AST, type_only: bool) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.append(Import(resolve(alias.name), type_only, node.lineno))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                target = f"{base}.{alias.name}"
                target = target if target in known else resolve(base)
                found.append(Import(target, type_only, node.lineno))
        visit(node, type_only)

    visit(ast.parse(path.read_text(), filename=str(path)), False)
    return found


def cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) per strongly connected component with more than one node."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(node: str) -> None:  # Tarjan; the graphs here are a few hundred nodes
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                connect(nxt)
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
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return [_path_through(graph, set(c)) for c in components]


def _path_through(graph: Mapping[str, set[str]], component: set[str]) -> list[str]:
    """The shortest cycle through the smallest name of ``component``, closing on its start."""
    start = min(component)
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:  # breadth first from start until an edge leads back to it
        following = []
        for node in frontier:
            for nxt in sorted(graph.get(node, set()) & component):
                if nxt == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [*reversed(path), start]
                if nxt not in parents:
                    parents[nxt] = node
                    following.append(nxt)
        frontier = following
    return sorted(component)  # not reached: every node of a component lies on a cycle


def package_of(module: str, packages: Iterable[str]) -> str | None:
    return next((p for p in packages if module == p or module.startswith(p + ".")), None)


def within(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


@dataclass(frozen=True)
class Tree:
    modules: dict[str, Path]
    imports: dict[str, list[Import]]

    @classmethod
    def read(cls, root: Path, tops: Iterable[str], skip: Iterable[str] = ()) -> Tree:
        modules = collect_modules(root, tops, skip)
        known = set(modules) | set(collect_modules(root, [s for s in skip if (root / s).is_dir()]))
        return cls(modules, {m: imports_of(m, p, known) for m, p in modules.items()})

    def module_graph(self) -> dict[str, set[str]]:
        """Module -> the modules of the tree it imports (``TYPE_CHECKING`` ones left out)."""
        graph = {}
        for module, imps in self.imports.items():
            runs = {i.target for i in imps if not i.type_only}
            graph[module] = (runs & set(self.modules)) - {module}
        return graph

    def package_graph(self, packages: Iterable[str]) -> dict[str, set[str]]:
        """Package -> the other ``packages`` its modules import (``TYPE_CHECKING`` left out)."""
        packages = tuple(packages)
        graph: dict[str, set[str]] = {p: set() for p in packages}
        for module, imps in self.imports.items():
            source = package_of(module, packages)
            for imp in imps:
                target = package_of(imp.target, packages)
                if source and target and source != target and not imp.type_only:
                    graph[source].add(target)
        return graph

    def room_violations(self, rooms: Iterable[Room]) -> list[str]:
        found = []
        for room in rooms:
            for module, imps in sorted(self.imports.items()):
                if not within(module, [room.package]):
                    continue
                for imp in imps:
                    if not room.allows(imp.target):
                        found.append(
                            f"{module}:{imp.line} imports {imp.target}; {room.package} is "
                            f"{room.why}"
                        )
        return found


def line_counts(root: Path, tops: Iterable[str], skip: Iterable[str] = ()) -> dict[str, int]:
    """``{path relative to root: lines}`` of every module under ``root/<top>``."""
    return {
        str(path.relative_to(root)): len(path.read_text().splitlines())
        for path in collect_modules(root, tops, skip).values()
    }
