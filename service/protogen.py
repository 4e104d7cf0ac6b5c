"""Regenerate the wire code: `python -m service.protogen [--check]` (what `make protos` runs).

Two steps, both deterministic:
1. render the ``Method``, ``MaskKind``, ``Score`` and ``Visualization`` enums of
   ``protos/saliency/v1/saliency.proto`` from the engine's four registries, keeping every
   number ever given (removed names become ``reserved``), each value commented with its
   member's description;
2. compile that file and TorchServe's own ``inference.proto`` (read from the installed
   TorchServe jar, so it always matches the server we run) into ``service/_proto`` with
   typed stubs.

``--check`` does both into a temporary folder and fails when the committed files differ.
"""

from __future__ import annotations

import argparse
import filecmp
import re
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

from service.protocol.families import MASK, METHOD, SCORE, VISUALIZATION, Family

REPO = Path(__file__).resolve().parent.parent
PROTO = REPO / "protos" / "saliency" / "v1" / "saliency.proto"
OUT = REPO / "service" / "_proto"


def render_enum(proto_text: str, family: Family, members: Sequence[tuple[str, str]]) -> str:
    """The proto text with ``family``'s generated block rendered for ``members``.

    Args:
        proto_text: the whole ``.proto`` file.
        family: which enum, and its naming rule.
        members: ``(name, description)`` of every registered member.
    """
    block = re.compile(
        rf"(// BEGIN GENERATED {family.enum}\b[^\n]*\n)(.*?)(// END GENERATED {family.enum}\b)",
        re.DOTALL,
    )
    match = block.search(proto_text)
    if match is None:
        raise SystemExit(f"{PROTO}: no '// BEGIN GENERATED {family.enum}' block")
    # Active values and retired ones (kept as comments so a returning name gets its number).
    entry = re.compile(
        rf"^\s*(?://\s*retired:\s*)?({family.prefix}[A-Z0-9_]+)\s*=\s*(\d+);", re.MULTILINE
    )
    numbers = {
        family.name_of(value_name): int(num)
        for value_name, num in entry.findall(match.group(2))
        if value_name != family.unspecified_name
    }
    names = [name for name, _ in members]
    next_number = max([0, *numbers.values()]) + 1
    for name in names:
        if name not in numbers:
            numbers[name] = next_number
            next_number += 1
    lines = [
        f"enum {family.enum} {{",
        f"  // {family.unspecified}",
        f"  {family.unspecified_name} = 0;",
    ]
    descriptions = dict(members)
    for num, name in sorted((numbers[n], n) for n in names):
        lines.append(f"  // {descriptions[name]}")
        lines.append(f"  {family.value_name(name)} = {num};")
    retired = sorted((num, name) for name, num in numbers.items() if name not in names)
    for num, name in retired:
        lines.append(f"  // retired: {family.value_name(name)} = {num};")
    if retired:
        lines.append(f"  reserved {', '.join(str(num) for num, _ in retired)};")
    lines.append("}")
    rendered = "\n".join(lines) + "\n"
    return proto_text[: match.start(2)] + rendered + proto_text[match.end(2) :]


def render_enums(proto_text: str) -> str:
    """The proto text with the four registry-driven enums rendered."""
    from service.engine.registry import MASKS, METHODS, SCORES

    proto_text = render_enum(
        proto_text, METHOD, [(m.name, m.description) for m in METHODS.members()]
    )
    proto_text = render_enum(proto_text, MASK, [(m.name, m.description) for m in MASKS.members()])
    scores = [
        (s.name, f"{s.description}; {'higher' if s.higher_is_better else 'lower'} is better")
        for s in SCORES.members()
    ]
    proto_text = render_enum(proto_text, SCORE, scores)
    from service.engine.visualize import VISUALIZERS

    visualizers = [(v.name, v.description) for v in VISUALIZERS.members()]
    return render_enum(proto_text, VISUALIZATION, visualizers)


def _torchserve_proto(dest: Path) -> Path:
    import ts

    jar = Path(ts.__file__).parent / "frontend" / "model-server.jar"
    with zipfile.ZipFile(jar) as archive:
        text = archive.read("proto/inference.proto").decode()
    path = dest / "torchserve" / "inference.proto"
    path.parent.mkdir(parents=True)
    path.write_text(text)
    return path


def _compile(proto_root: Path, proto: Path, out: Path) -> None:
    import google.rpc
    from grpc_tools import protoc

    bindir = Path(sys.executable).parent
    includes = [
        str(Path(protoc.__file__).parent / "_proto"),
        str(Path(google.rpc.__path__[0]).parent.parent),
    ]
    args = [
        "grpc_tools.protoc",
        f"-I{proto_root}",
        *[f"-I{inc}" for inc in includes],
        f"--plugin=protoc-gen-mypy={bindir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bindir / 'protoc-gen-mypy_grpc'}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        str(proto),
    ]
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed on {proto}")


def _fix_imports(out: Path) -> None:
    # protoc writes imports relative to the proto root; make them package-absolute.
    for path in out.rglob("*.py*"):
        text = path.read_text()
        fixed = re.sub(
            r"^from (saliency\.v1|torchserve) import",
            r"from service._proto.\1 import",
            text,
            flags=re.MULTILINE,
        )
        fixed = re.sub(
            r"^import (saliency\.v1|torchserve)\.",
            r"import service._proto.\1.",
            fixed,
            flags=re.MULTILINE,
        )
        if fixed != text:
            path.write_text(fixed)
    for folder in [out, *[p for p in out.rglob("*") if p.is_dir()]]:
        (folder / "__init__.py").touch()


def generate(proto_text: str, out: Path) -> str:
    """Render the enum, compile everything into ``out``; returns the rendered proto text."""
    rendered = render_enums(proto_text)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ours = root / "saliency" / "v1" / "saliency.proto"
        ours.parent.mkdir(parents=True)
        ours.write_text(rendered)
        _compile(root, ours, out)
        _compile(root, _torchserve_proto(root), out)
    _fix_imports(out)
    return rendered


def _diff(a: Path, b: Path) -> list[str]:
    cmp = filecmp.dircmp(a, b, ignore=["__pycache__"])
    problems = [f"only in {cmp.left}: {n}" for n in cmp.left_only]
    problems += [f"only in {cmp.right}: {n}" for n in cmp.right_only]
    problems += [f"differs: {Path(cmp.left) / n}" for n in cmp.diff_files]
    for sub in cmp.common_dirs:
        problems += _diff(a / sub, b / sub)
    return problems


def check() -> list[str]:
    """What is stale, as readable lines; empty when the committed code is fresh."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "_proto"
        out.mkdir()
        rendered = generate(PROTO.read_text(), out)
        stale = f"{PROTO}: the registry-driven enums are stale"
        problems = [] if rendered == PROTO.read_text() else [stale]
        return problems + _diff(out, OUT)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if generated code is stale")
    args = parser.parse_args(argv)
    if args.check:
        problems = check()
        for line in problems:
            print(line, file=sys.stderr)
        if problems:
            print("generated code is stale: run `make protos`", file=sys.stderr)
        return 1 if problems else 0
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    PROTO.write_text(generate(PROTO.read_text(), OUT))
    print(f"wrote {OUT.relative_to(REPO)} and the registry enums of {PROTO.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
