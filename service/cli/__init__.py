"""``saliency-serve``: explain, visualize, concepts, methods; serve, gateway, torchserve, archive.

The parser imports nothing heavy: the client commands need the base install only, and
the server commands import torch, TorchServe and the gateway when they run (and say what
to install when those are missing).
"""

from __future__ import annotations

import argparse

from service.cli import (
    archive_command,
    client_commands,
    concepts_command,
    serve_command,
    server_commands,
    visualize_command,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="saliency-serve", description=__doc__.splitlines()[0].replace("``", "")
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve_command.add_parser(sub)
    server_commands.add_parsers(sub)
    archive_command.add_parser(sub)
    client_commands.add_parsers(sub)
    visualize_command.add_parsers(sub)
    concepts_command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))
