"""Commands that run the service: gateway, torchserve, archive, bench (serve: serve_command).

They need the ``server`` extra; each imports its heavy modules only when it runs, and
first says what to install when they are missing (a client-only install has the parser).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from service.cli.gateway_flags import add_gateway_flags, gateway_config

DEFAULT_STORE = Path(os.environ.get("SALIENCY_MODEL_STORE", "model_store"))
SERVER_MODULES = ("torch", "onnxruntime", "cv2", "ts")
GATEWAY_MODULES = ("grpc_health", "grpc_reflection", "prometheus_client", "starlette", "uvicorn")
Command = Callable[[argparse.Namespace], int]


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # an import hook may refuse it outright
        return False


def needs(modules: tuple[str, ...]) -> Callable[[Command], Command]:
    """Run the command only where ``modules`` import; else say what to install (exit 2)."""

    def decorate(command: Command) -> Command:
        def checked(args: argparse.Namespace) -> int:
            missing = [m for m in modules if not _installed(m)]
            if missing:
                print(
                    f"saliency-serve {args.command} needs the server install, which this "
                    f"environment lacks (missing: {', '.join(missing)}). Install it with:\n"
                    "    pip install 'saliency-serve[server]'\n"
                    "(or `make install` in a checkout). The client commands (explain, "
                    "methods) work without it.",
                    file=sys.stderr,
                )
                return 2
            return command(args)

        return checked

    return decorate


def _csv_floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",")]


def _size(text: str) -> tuple[int, int, int]:
    values = [int(v) for v in text.split(",")]
    if len(values) != 3:
        raise argparse.ArgumentTypeError("input size is C,H,W, e.g. 3,224,224")
    return values[0], values[1], values[2]


def _ensure_default_archive(store: Path) -> Path:
    """The default archive, rebuilt when the trained default model (or what the archive
    ships with it: the concept bank's format) changed since."""
    from service.archive import DEFAULT_NAME, build_default_archive
    from service.engine.concepts.bank import FORMAT
    from service.models.default import ensure_default_model

    mar = store / f"{DEFAULT_NAME}.mar"
    version = json.loads((ensure_default_model() / "meta.json").read_text())["version"]
    trained = f"{version} concepts-{FORMAT}"
    stamp = store / f"{DEFAULT_NAME}.mar.source"
    if not mar.exists() or not stamp.exists() or stamp.read_text() != trained:
        print(f"building the default model archive into {mar}...", flush=True)
        build_default_archive(store)
        stamp.write_text(trained)
    return mar


@needs(GATEWAY_MODULES)
def cmd_gateway(args: argparse.Namespace) -> int:
    from service.model_store import StoreError

    try:
        names, default = gateway_models(args)
    except StoreError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 2
    config = gateway_config(
        args,
        upstream=args.upstream,
        upstream_key_file=args.upstream_key_file,
        models=names,
        default_model=default,
        split_pools=not args.single_pool,
    )
    asyncio.run(_until_signal(config, args.drain_seconds))
    return 0


def gateway_models(args: argparse.Namespace) -> tuple[tuple[str, ...], str]:
    """The names ``gateway`` routes (``--model``, or its ``--model-store``'s archives, as
    TorchServe registers them) and its default model, by ``serve``'s rule.

    Raises:
        StoreError: the store cannot be served, or ``--default-model`` is not among them.
    """
    from service.model_store import choose_default, store_models

    names = tuple(args.model or store_models(args.model_store))
    return names, choose_default(names, args.default_model)[0]


async def _until_signal(config: Any, drain_s: float) -> None:
    from service.gateway.server import run_gateway

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await run_gateway(config, stop, grace=drain_s)
    print("gateway stopped", flush=True)


@needs(SERVER_MODULES)
def cmd_torchserve(args: argparse.Namespace) -> int:
    from service.launcher import TorchServe
    from service.model_store import StoreError, store_models

    try:
        models = store_models(args.model_store)
    except StoreError as exc:
        print(f"torchserve: {exc}", file=sys.stderr)
        return 2
    if not models:
        print(f"no .mar in {args.model_store}", file=sys.stderr)
        return 2
    server = TorchServe(
        args.model_store.resolve(), models, Path(args.run_dir).resolve(), config=args.config
    )

    def stop(signum: int, frame: object) -> None:
        # Kubernetes sends SIGTERM: stop the whole TorchServe process group, then exit.
        server.stop()
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    server.start()
    assert server.process is not None
    try:
        status = server.process.wait()
    finally:
        server.stop()
    # Not asked to stop: the Java process died. Exit non-zero so that the kubelet (the
    # supervisor in a pod) restarts this container and counts it.
    print(f"TorchServe exited unexpectedly (status {status})", file=sys.stderr)
    return status or 1


@needs(SERVER_MODULES)
def cmd_bench(args: argparse.Namespace) -> int:
    import runpy

    sys.argv = [f"bench.{args.suite}"]
    runpy.run_module(f"bench.{args.suite}", run_name="__main__")
    return 0


def add_parsers(sub: Any) -> None:
    gateway = sub.add_parser("gateway", help="the gRPC gateway alone")
    gateway.add_argument("--upstream", default="127.0.0.1:7070")
    gateway.add_argument(
        "--upstream-key-file", type=Path, help="TorchServe's key_file.json (token auth on)"
    )
    served = gateway.add_mutually_exclusive_group(required=True)
    served.add_argument("--model", action="append", help="a served model name (repeatable)")
    served.add_argument(
        "--model-store", type=Path, help="serve the names of this store's archives (as serve)"
    )
    gateway.add_argument(
        "--default-model", metavar="NAME", help="as serve's (default: the same rule)"
    )
    gateway.add_argument(
        "--single-pool",
        action="store_true",
        help="TorchServe has no <model>--predict pools: Predict shares the explain queue",
    )
    add_gateway_flags(gateway)
    gateway.set_defaults(func=cmd_gateway)

    torchserve = sub.add_parser("torchserve", help="TorchServe in the foreground")
    torchserve.add_argument("--model-store", type=Path, default=DEFAULT_STORE)
    torchserve.add_argument("--config", type=Path, default=None)
    torchserve.add_argument("--run-dir", default=".cache/run")
    torchserve.add_argument("--foreground", action="store_true", help="(always)")
    torchserve.set_defaults(func=cmd_torchserve)

    bench = sub.add_parser("bench", help="run a benchmark suite (see bench/)")
    bench.add_argument("suite", nargs="?", default="run")
    bench.set_defaults(func=cmd_bench)
