"""The house's rooms, read from the source with ``ast`` (nothing here imports the code).

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

A rule is one line of :data:`ROOMS`; a package in it takes part in the package-cycle check.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SOURCES = ("service", "handlers")  # where the rules hold
GENERATED = ("service/_proto",)  # written by `make protos`
MAX_LINES = 300
SIZED = (*SOURCES, "bench")  # hand-written code held to MAX_LINES

GRPC = ("grpc", "grpc_health", "grpc_reflection", "service._proto")
TORCHSERVE = ("ts",)
MODEL_CODE = ("torch", "onnxruntime", "service.runtime", "service.models")


@dataclass(frozen=True)
class Room:
    """What the modules of ``package`` may not import (dotted prefixes), and why."""

    package: str
    forbidden: tuple[str, ...]
    why: str


ROOMS = (
    Room(
        "service.engine",
        (
            *GRPC,
            *TORCHSERVE,
            "service.serving",
            "service.gateway",
            "service.runtime",
            "service.models",
            "handlers",
        ),
        "model-agnostic methods: torch and numpy only, hosted by anything",
    ),
    Room(
        "service.runtime",
        (*GRPC, *TORCHSERVE, "service.serving", "service.gateway", "handlers"),
        "load-time model preparation and forwards, below every host",
    ),
    Room(
        "service.models",
        (*GRPC, *TORCHSERVE, "service.serving", "service.gateway", "handlers"),
        "the default model: data, architecture, training",
    ),
    Room(
        "service.serving",
        ("grpc", "grpc_health", "grpc_reflection", *TORCHSERVE, "service.gateway", "handlers"),
        "the request pipeline shared by every host, transport-free",
    ),
    Room(
        "service.gateway",
        (*TORCHSERVE, *MODEL_CODE, "handlers"),
        "a thin async front: it loads no model and runs no tensor code",
    ),
    Room("handlers", ("service.gateway",), "the TorchServe host; the gateway is another process"),
)

# Over MAX_LINES today, split by another task of the same round; removed at its merge.
SPLIT_BY_H10_PROTOCOL = {
    "service/serving/pipeline.py",  # split by h10-protocol
    "service/cli.py",  # split by h10-protocol
    "service/engine/scores.py",  # split by h10-protocol
}


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
                    if within(imp.target, room.forbidden):
                        found.append(
                            f"{module}:{imp.line} imports {imp.target}; {room.package} is "
                            f"{room.why}"
                        )
        return found


@pytest.fixture(scope="module")
def tree() -> Tree:
    return Tree.read(REPO, SOURCES, GENERATED)


def test_no_import_cycle_between_modules(tree: Tree) -> None:
    found = cycles(tree.module_graph())
    assert not found, "module import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_no_import_cycle_between_packages(tree: Tree) -> None:
    graph = tree.package_graph(room.package for room in ROOMS)
    found = cycles(graph)
    assert not found, "package import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_every_room_keeps_its_rule(tree: Tree) -> None:
    assert {room.package for room in ROOMS} <= set(tree.modules), "a rule names no package"
    violations = tree.room_violations(ROOMS)
    assert not violations, "imports across room rules:\n" + "\n".join(violations)


def hand_written_sizes(root: Path = REPO) -> dict[str, int]:
    """Lines of every hand-written module under :data:`SIZED`."""
    modules = collect_modules(root, SIZED, GENERATED)
    return {
        str(path.relative_to(root)): len(path.read_text().splitlines()) for path in modules.values()
    }


def test_no_hand_written_module_over_the_limit() -> None:
    sizes = hand_written_sizes()
    over = {path: n for path, n in sizes.items() if n > MAX_LINES}
    unexpected = {p: n for p, n in over.items() if p not in SPLIT_BY_H10_PROTOCOL}
    assert not unexpected, f"modules over {MAX_LINES} lines: " + ", ".join(
        f"{p} ({n})" for p, n in sorted(unexpected.items(), key=lambda kv: -kv[1])
    )
    stale = sorted(p for p in SPLIT_BY_H10_PROTOCOL if sizes.get(p, 0) <= MAX_LINES)
    assert not stale, f"split already, remove from SPLIT_BY_H10_PROTOCOL: {', '.join(stale)}"


# -- the checker on trees whose answer is known ----------------------------------------------


def write_tree(root: Path, files: Mapping[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_checker_finds_module_cycles_lazy_ones_too_but_not_type_only_ones(tmp_path: Path) -> None:
    root = write_tree(
        tmp_path,
        {
            "app/__init__.py": "",
            "app/a.py": "from app import b\n",
            "app/b.py": "from . import c\n",
            "app/c.py": "import app.a\n",
            "app/d.py": "def f():\n    from app import e\n",
            "app/e.py": "from typing import TYPE_CHECKING\n"
            "if TYPE_CHECKING:\n    from app import d\n"
            "from app import d\n",
            "app/f.py": "import typing\nif typing.TYPE_CHECKING:\n    from app.g import X\n",
            "app/g.py": "from app.f import Y\n",
        },
    )
    found = cycles(Tree.read(root, ["app"]).module_graph())
    assert sorted(found) == [["app.a", "app.b", "app.c", "app.a"], ["app.d", "app.e", "app.d"]]


def test_checker_counts_lazy_imports_between_packages(tmp_path: Path) -> None:
    root = write_tree(
        tmp_path,
        {
            "app/__init__.py": "",
            "app/low/__init__.py": "",
            "app/low/x.py": "def f():\n    from app.high import y\n",
            "app/high/__init__.py": "",
            "app/high/y.py": "from ..low.x import f\n",
        },
    )
    graph = Tree.read(root, ["app"]).package_graph(["app.low", "app.high"])
    assert graph == {"app.low": {"app.high"}, "app.high": {"app.low"}}
    assert cycles(graph) == [["app.high", "app.low", "app.high"]]


def test_checker_names_the_line_that_breaks_a_room_rule(tmp_path: Path) -> None:
    root = write_tree(
        tmp_path,
        {
            "app/__init__.py": "",
            "app/core/__init__.py": "",
            "app/core/ok.py": "import numpy\nimport grpcio_like\n",
            "app/core/bad.py": "import os\n\n\ndef f():\n    import grpc.aio\n",
        },
    )
    rule = Room("app.core", ("grpc",), "transport-free")
    assert Tree.read(root, ["app"]).room_violations([rule]) == [
        "app.core.bad:5 imports grpc.aio; app.core is transport-free"
    ]


def test_checker_resolves_relative_and_from_imports(tmp_path: Path) -> None:
    root = write_tree(
        tmp_path,
        {
            "app/__init__.py": "",
            "app/pkg/__init__.py": "from .mod import thing\n",
            "app/pkg/mod.py": "from .. import other\nfrom app.pkg import sub\nfrom app import os\n",
            "app/pkg/sub.py": "",
            "app/other.py": "",
        },
    )
    imports = Tree.read(root, ["app"]).imports
    assert [i.target for i in imports["app.pkg"]] == ["app.pkg.mod"]
    assert [i.target for i in imports["app.pkg.mod"]] == ["app.other", "app.pkg.sub", "app"]


def test_the_size_rule_counts_this_tree() -> None:
    sizes = hand_written_sizes()
    assert "service/engine/engine.py" in sizes and "bench/run.py" in sizes
    assert not any(path.startswith(GENERATED) for path in sizes)
