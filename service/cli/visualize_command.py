"""``saliency-serve visualize --class N``: a class's visualisation from a running server.

Streams the search (``VisualizeClassStream``), printing its progress, and writes the
image (and MACO's transparency map) as PNGs. Base install only, like ``explain``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import grpc
from PIL import Image

from service.cli.client_commands import DEFAULT_ADDRESS, add_connection_flags, assignments, connect
from service.protocol.errors import InvalidInputError
from service.protocol.families import DEFAULT_VISUALIZATION
from service.protocol.names import VISUALIZATIONS


def add_parsers(sub: Any) -> None:
    visualize = sub.add_parser(
        "visualize", help="the image a served model scores highest for a class"
    )
    visualize.add_argument(
        "--class",
        dest="classes",
        type=int,
        action="append",
        required=True,
        metavar="N",
        help="class index (repeatable)",
    )
    visualize.add_argument(
        "--method", choices=VISUALIZATIONS.names(), default=DEFAULT_VISUALIZATION
    )
    visualize.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a parameter of the method, e.g. steps=256 (repeatable)",
    )
    visualize.add_argument("--seed", type=int, default=0)
    visualize.add_argument(
        "--image-every",
        type=int,
        default=0,
        metavar="K",
        help="also write the image every K steps (progress_STEP.png)",
    )
    visualize.add_argument("--model", default="")
    visualize.add_argument("--out", type=Path, default=Path("visualizations"))
    visualize.add_argument("--address", default=DEFAULT_ADDRESS)
    visualize.add_argument("--timeout", type=float, default=120.0)
    add_connection_flags(visualize)
    visualize.set_defaults(func=cmd_visualize)


def cmd_visualize(args: argparse.Namespace) -> int:
    try:
        params = dict(assignments(args.param, "--param"))
        if any(c < 0 for c in args.classes) or args.image_every < 0:
            raise InvalidInputError("--class and --image-every must be >= 0")
        client = connect(args)
    except (OSError, ValueError, InvalidInputError) as exc:
        print(f"visualize: {exc}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    with client:
        for target in args.classes:
            try:
                result = _one(client, target, params, args)
            except grpc.RpcError as exc:
                print(f"{exc.code().name}: {exc.details()}", file=sys.stderr)
                return 1
            print(
                f"class {result.target} ({result.target_label}): p={result.target_probability:.3f} "
                f"logit={result.target_logit:.2f}{' (cached)' if result.cached else ''}"
            )
    return 0


def _one(client: Any, target: int, params: dict[str, str], args: argparse.Namespace) -> Any:
    from service.client import decode_rgb

    parts = client.visualize_class_stream(
        target,
        method=args.method,
        params=params,
        seed=args.seed,
        image_every=args.image_every,
        model=args.model,
        timeout=args.timeout,
    )
    stem = f"{args.method}_{target}"
    result = None
    for part in parts:
        if part.WhichOneof("part") == "result":
            result = part.result
            continue
        progress = part.progress
        print(f"  step {progress.step}/{progress.steps} logit={progress.target_logit:.2f}")
        if progress.png:
            Image.fromarray(decode_rgb(progress.png)).save(
                args.out / f"{stem}_step{progress.step:04d}.png"
            )
    assert result is not None, "the stream ends with its result"
    stem = f"{args.method}_{target}_{result.target_label}"
    (args.out / f"{stem}.png").write_bytes(result.png)
    if result.transparency.data:  # an 8-bit PNG spanning the map's range
        (args.out / f"{stem}_transparency.png").write_bytes(result.transparency.data)
    return result
