"""The import-graph checker on small trees whose answers are known."""

from __future__ import annotations

import textwrap
from pathlib import Path

from tests.import_graph import Room, Tree, cycles


def read_tree(root: Path, spec: str) -> Tree:
    """The tree of ``app`` written under ``root`` from ``spec``: a ``== path`` line per file,
    then its text; every folder without an ``__init__.py`` gets an empty one."""
    for chunk in textwrap.dedent(spec).split("== ")[1:]:
        name, _, text = chunk.partition("\n")
        path = root / name.strip()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for folder in [root / "app", *(root / "app").rglob("*/")]:
        (folder / "__init__.py").touch()
    return Tree.read(root, ["app"])


def test_checker_finds_module_cycles_lazy_ones_too_but_not_type_only_ones(tmp_path: Path) -> None:
    tree = read_tree(
        tmp_path,
        """
        == app/a.py
        from app import b
        == app/b.py
        from . import c
        == app/c.py
        import app.a
        == app/d.py
        def f():
            from app import e
        == app/e.py
        from typing import TYPE_CHECKING
        if TYPE_CHECKING:
            from app import d
        from app import d
        == app/f.py
        import typing
        if typing.TYPE_CHECKING:
            from app.g import X
        == app/g.py
        from app.f import Y
        """,
    )
    found = cycles(tree.module_graph())
    assert sorted(found) == [["app.a", "app.b", "app.c", "app.a"], ["app.d", "app.e", "app.d"]]


def test_checker_counts_lazy_imports_between_packages(tmp_path: Path) -> None:
    tree = read_tree(
        tmp_path,
        """
        == app/low/x.py
        def f():
            from app.high import y
        == app/high/y.py
        from ..low.x import f
        """,
    )
    graph = tree.package_graph(["app.low", "app.high"])
    assert graph == {"app.low": {"app.high"}, "app.high": {"app.low"}}
    assert cycles(graph) == [["app.high", "app.low", "app.high"]]


def test_checker_names_the_line_that_breaks_a_room_rule(tmp_path: Path) -> None:
    tree = read_tree(
        tmp_path,
        """
        == app/core/ok.py
        import numpy
        import grpcio_like
        == app/core/bad.py
        import os


        def f():
            import grpc.aio
        """,
    )
    rule = Room("app.core", ("grpc",), "transport-free")
    assert tree.room_violations([rule]) == [
        "app.core.bad:5 imports grpc.aio; app.core is transport-free"
    ]


def test_checker_resolves_relative_and_from_imports(tmp_path: Path) -> None:
    tree = read_tree(
        tmp_path,
        """
        == app/pkg/__init__.py
        from .mod import thing
        == app/pkg/mod.py
        from .. import other
        from app.pkg import sub
        from app import os
        == app/pkg/sub.py
        == app/other.py
        """,
    )
    assert [i.target for i in tree.imports["app.pkg"]] == ["app.pkg.mod"]
    assert [i.target for i in tree.imports["app.pkg.mod"]] == ["app.other", "app.pkg.sub", "app"]


def test_checker_keeps_a_room_to_the_standard_library_and_what_it_allows(tmp_path: Path) -> None:
    tree = read_tree(
        tmp_path,
        """
        == app/wire/__init__.py
        from __future__ import annotations
        import json
        from collections.abc import Mapping
        from google.protobuf import message
        from app.wire import codes
        == app/wire/codes.py
        import numpy
        from app import other
        == app/other.py
        """,
    )
    rule = Room("app.wire", (), "protobuf and stdlib only", only=("google.protobuf",))
    assert tree.room_violations([rule]) == [
        "app.wire.codes:1 imports numpy; app.wire is protobuf and stdlib only",
        "app.wire.codes:2 imports app.other; app.wire is protobuf and stdlib only",
    ]
