"""Commands that talk to a running server: ``explain``, ``methods`` and ``models`` (base
install only).

Their choices come from the generated wire enums, which ``make protos`` renders from the
registries: the names are the server's without importing torch.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
from PIL import Image

from service.protocol.errors import InvalidInputError
from service.protocol.families import DEFAULT_METHOD
from service.protocol.names import MASKS, METHODS, SCORES

T = TypeVar("T")
DEFAULT_ADDRESS = "localhost:50051"
MODEL_HELP = "a served model's name (`saliency-serve models` lists them); default: the server's"


def add_parsers(sub: Any) -> None:
    explain = sub.add_parser("explain", help="explain an image through a running server")
    explain.add_argument("image", type=Path)
    explain.add_argument("--method", action="append", choices=METHODS.names())
    explain.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="METHOD.NAME=VALUE",
        help="a method parameter, e.g. integrated_gradients.n_steps=64 (repeatable)",
    )
    explain.add_argument("--top-k", type=int, default=1)
    explain.add_argument("--target", type=int, action="append")
    explain.add_argument("--mask", choices=MASKS.names(), default=MASKS.name(0))
    explain.add_argument(
        "--mask-param", action="append", default=[], metavar="NAME=VALUE", help="(repeatable)"
    )
    explain.add_argument("--score", action="append", choices=SCORES.names())
    explain.add_argument("--seed", type=int, default=0)
    explain.add_argument(
        "--concepts",
        type=int,
        default=0,
        metavar="N",
        help="also the N most important CRAFT concepts per target, with their maps",
    )
    explain.add_argument("--out", type=Path, default=Path("explanations"))
    explain.add_argument(
        "--html", type=Path, metavar="FILE", help="also write a self-contained HTML report"
    )
    explain.add_argument("--address", default=DEFAULT_ADDRESS)
    explain.add_argument("--model", default="", help=MODEL_HELP)
    explain.add_argument("--timeout", type=float, default=120.0)
    explain.add_argument(
        "--stream",
        action="store_true",
        help="ExplainStream: a line per anytime map of a slow method as it refines",
    )
    add_connection_flags(explain)
    explain.set_defaults(func=cmd_explain)

    methods = sub.add_parser("methods", help="list the methods, masks and scores")
    methods.add_argument(
        "--address", help="ask this server (descriptions, parameters); else the wire names"
    )
    methods.add_argument("--model", default="", help=MODEL_HELP)
    add_connection_flags(methods)
    methods.set_defaults(func=cmd_methods)

    models = sub.add_parser("models", help="list the models a running server serves")
    models.add_argument("--address", default=DEFAULT_ADDRESS)
    add_connection_flags(models)
    models.set_defaults(func=cmd_models)


def add_connection_flags(parser: argparse.ArgumentParser) -> None:
    """How a client command reaches a gateway that has TLS, mutual TLS or tokens."""
    group = parser.add_argument_group("connection security")
    group.add_argument("--tls", action="store_true", help="TLS with the system's roots")
    group.add_argument("--tls-ca", type=Path, help="TLS, trusting this CA (PEM)")
    group.add_argument("--tls-cert", type=Path, help="client certificate for mutual TLS (PEM)")
    group.add_argument("--tls-key", type=Path, help="its private key (PEM)")
    group.add_argument("--tls-server-name", help="name to check the certificate against")
    group.add_argument(
        "--token-file", type=Path, help="file holding a bearer token for --auth-token-file"
    )


def connect(args: argparse.Namespace) -> Any:
    """A :class:`~service.client.SaliencyClient` for ``args.address`` with its security."""
    from service.client import SaliencyClient, tls_credentials

    secure = args.tls or args.tls_ca or args.tls_cert
    credentials = tls_credentials(args.tls_ca, args.tls_cert, args.tls_key) if secure else None
    token = args.token_file.read_text().strip() if args.token_file else None
    return SaliencyClient(
        args.address, credentials=credentials, token=token, server_name=args.tls_server_name
    )


def ask(args: argparse.Namespace, command: str, call: Callable[[Any], T]) -> T:
    """One call through a client connected as ``args`` say; on failure, the reason on
    stderr and exit status 2 (cannot connect: bad TLS files...) or 1 (the call failed)."""
    try:
        client = connect(args)
    except (OSError, ValueError) as exc:
        print(f"{command}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    with client:
        try:
            return call(client)
        except grpc.RpcError as exc:
            print(f"{exc.code().name}: {exc.details()}", file=sys.stderr)
            raise SystemExit(1) from None


def assignments(items: list[str], what: str) -> list[tuple[str, str]]:
    pairs = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidInputError(f"{what} must look like NAME=VALUE, got {item!r}")
        pairs.append((key.strip(), value))
    return pairs


def method_calls(methods: list[str], params: list[str]) -> list[tuple[str, dict[str, str]]]:
    """``--method`` and ``--param method.name=value`` as the client's method arguments."""
    calls: dict[str, dict[str, str]] = {name: {} for name in methods}
    for key, value in assignments(params, "--param"):
        method, _, name = key.partition(".")
        if method not in calls or not name:
            raise InvalidInputError(
                f"--param {key}: name a requested --method and a parameter, e.g. "
                "integrated_gradients.n_steps=64"
            )
        calls[method][name] = value
    return list(calls.items())


def cmd_explain(args: argparse.Namespace) -> int:
    from service.client import collect_stream, decode_map, decode_mask, draw_box, overlay

    try:
        with Image.open(args.image) as opened:
            image = np.asarray(opened.convert("RGB"))
        methods = method_calls(args.method or [DEFAULT_METHOD], args.param)
        mask_params = dict(assignments(args.mask_param, "--mask-param"))
        client = connect(args)
    except (OSError, ValueError, InvalidInputError) as exc:
        print(f"explain: {exc}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    with client:
        try:
            options: dict[str, Any] = {
                "methods": methods,
                "top_k": args.top_k,
                "targets": args.target or [],
                "mask": args.mask,
                "mask_params": mask_params,
                "seed": args.seed,
                "scores": args.score or [],
                "model": args.model,
                "concepts": args.concepts,
                "timeout": args.timeout,
            }
            if args.stream:
                parts = client.explain_stream(args.image, **options)
                reply = collect_stream(parts, on_refinement=print_refinement)
            else:
                reply = client.explain(args.image, **options)
        except grpc.RpcError as exc:
            print(f"{exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
        except InvalidInputError as exc:
            print(f"explain: {exc}", file=sys.stderr)
            return 2
    for p in reply.predictions:
        print(f"{p.label:>12s}  {p.probability:.3f}")
    tiles = [image]
    for item in reply.explanations:
        stem = f"{METHODS.label(item.method)}_{item.target_label}"
        heat = overlay(image, decode_map(item.map))
        if item.HasField("box"):
            heat = draw_box(heat, item.box)
        Image.fromarray(heat).save(args.out / f"{stem}.png")
        tiles.append(heat)
        if item.mask.png:
            Image.fromarray(decode_mask(item.mask)).save(args.out / f"{stem}_mask.png")
        extra = (
            f" completeness={item.completeness_error:.4f}"
            if item.HasField("completeness_error")
            else ""
        )
        scores = " ".join(f"{SCORES.label(s.score)}={s.value:.3f}" for s in item.scores)
        print(f"{stem}: {item.seconds * 1000:.1f} ms{extra} {scores}".rstrip())
    for found in reply.concepts:
        for concept in found.concepts:
            stem = f"concept{concept.concept}_{found.target_label}"
            heat = overlay(image, decode_map(concept.map))
            Image.fromarray(heat).save(args.out / f"{stem}.png")
            print(f"{stem}: importance {concept.importance:.3f}")
    Image.fromarray(np.hstack(tiles)).save(args.out / "overview.png")
    print(f"wrote {len(reply.explanations)} overlays and overview.png to {args.out}")
    if args.html:
        from service.client.report import html_report

        args.html.write_text(html_report(image, reply, args.image.name), encoding="utf-8")
        print(f"wrote the report {args.html}")
    return 0


def print_refinement(refinement: Any) -> None:
    """One progress line per anytime map: which map, and the forwards it cost so far."""
    print(
        f"{METHODS.label(refinement.method)} target {refinement.target}: map after "
        f"{refinement.forwards}/{refinement.forwards_total} forwards"
    )


def cmd_methods(args: argparse.Namespace) -> int:
    if not args.address:
        for title, enum in (("methods", METHODS), ("masks", MASKS), ("scores", SCORES)):
            print(f"{title}: {', '.join(enum.names())}")
        print("(--address HOST:PORT lists descriptions and parameters from a server)")
        return 0
    info = ask(args, "methods", lambda client: client.model_info(args.model))
    for group in (info.methods, info.masks, info.scores):
        for entry in group:
            params = ", ".join(f"{p.name}={p.default}" for p in entry.params)
            print(f"{entry.name:22s} {entry.description}  [{params}]")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from service.protocol.catalog import describe

    listing = ask(args, "models", lambda client: client.list_models())
    for entry in listing.models:
        state = "" if entry.serving else "  [not serving now]"
        print(describe(entry) + state)
    return 0
