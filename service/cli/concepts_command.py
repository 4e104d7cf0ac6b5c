"""``saliency-serve concepts``: build a model's CRAFT concept bank, or show a served one.

``concepts --archive X.mar --images DIR`` builds a bank from ``DIR/<label>/*`` (one
sub-folder per class label) with the archive's own model and writes it into the archive
(server install). ``concepts --show`` asks a running server (``GetConcepts``) and writes
each concept's most typical crops as PNGs (base install, like ``explain``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from service.cli.client_commands import DEFAULT_ADDRESS, add_connection_flags, ask
from service.cli.server_commands import SERVER_MODULES, needs


def add_parser(sub: Any) -> None:
    concepts = sub.add_parser(
        "concepts", help="build a CRAFT concept bank into a .mar, or show a served model's"
    )
    concepts.add_argument("--archive", type=Path, help="the .mar to add a bank to")
    concepts.add_argument(
        "--images", type=Path, help="one sub-folder per class label, holding its images"
    )
    concepts.add_argument("--k", type=int, default=8, help="concepts per class")
    concepts.add_argument("--crops", type=int, default=8, help="random crops per image")
    concepts.add_argument("--seed", type=int, default=0)
    concepts.add_argument(
        "--show", action="store_true", help="ask a running server and write the crops"
    )
    concepts.add_argument(
        "--class", dest="classes", type=int, action="append", default=[], metavar="N"
    )
    concepts.add_argument("--model", default="")
    concepts.add_argument("--out", type=Path, default=Path("concepts"))
    concepts.add_argument("--address", default=DEFAULT_ADDRESS)
    concepts.add_argument("--timeout", type=float, default=30.0)
    add_connection_flags(concepts)
    concepts.set_defaults(func=cmd_concepts)


def cmd_concepts(args: argparse.Namespace) -> int:
    if args.show:
        return _show(args)
    if not (args.archive and args.images):
        print("concepts: give --archive and --images (or --show)", file=sys.stderr)
        return 2
    if not (1 <= args.k <= 64 and 1 <= args.crops <= 64):
        print("concepts: --k and --crops must be in [1, 64]", file=sys.stderr)
        return 2
    return _build(args)


@needs(SERVER_MODULES)
def _build(args: argparse.Namespace) -> int:
    import zipfile

    from service.archive_code import ArchiveError
    from service.archive_concepts import add_concepts, archive_meta, images_from_folder

    try:
        meta = archive_meta(args.archive)
        images = images_from_folder(args.images, meta.labels, meta.input_size)
        add_concepts(
            args.archive, images, k=args.k, crops_per_image=args.crops, seed=args.seed,
            source=f"{args.images.name}: {sum(len(v) for v in images.values())} images",
            say=print,
        )  # fmt: skip
    except (OSError, KeyError, zipfile.BadZipFile, ArchiveError) as exc:
        print(f"concepts refused: {exc}", file=sys.stderr)
        return 2
    return 0


def _show(args: argparse.Namespace) -> int:
    reply = ask(
        args,
        "concepts",
        lambda client: client.concepts(args.classes, model=args.model, timeout=args.timeout),
    )
    print(f"layer {reply.layer}, {reply.k} concepts per class, {reply.source}")
    for item in reply.classes:
        folder = args.out / f"{item.target}_{item.target_label}"
        folder.mkdir(parents=True, exist_ok=True)
        for concept in item.concepts:
            for rank, png in enumerate(concept.crops):
                (folder / f"concept{concept.concept}_crop{rank}.png").write_bytes(png)
        print(f"class {item.target} ({item.target_label}): {len(item.concepts)} concepts")
    print(f"wrote the typical crops to {args.out}")
    return 0
