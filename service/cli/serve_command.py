"""``saliency-serve serve``: TorchServe and the gateway over every archive of a model store.

The store's rules (names, the built-in archive, the default model) are
:mod:`service.model_store`'s, shared with ``torchserve`` and ``gateway --model-store``.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path
from typing import Any

from service.cli.gateway_flags import add_gateway_flags, gateway_config
from service.cli.server_commands import (
    DEFAULT_STORE,
    GATEWAY_MODULES,
    SERVER_MODULES,
    _ensure_default_archive,
    needs,
)


@needs(SERVER_MODULES + GATEWAY_MODULES)
def cmd_serve(args: argparse.Namespace) -> int:
    from service.launcher import TorchServe, TorchServePorts
    from service.model_store import StoreError, choose_default, prepare_store
    from service.stack import gateway_options
    from service.supervisor import Supervisor, serve

    # SIGTERM (e.g. from a process manager) unwinds like Ctrl-C, through the finally below.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        models = prepare_store(args.model_store, args.default, _ensure_default_archive)
        default, why = choose_default(list(models), args.default_model)
    except StoreError as exc:
        print(f"serve: {exc}", file=sys.stderr)
        return 2
    ports = TorchServePorts.free() if args.free_torchserve_ports else TorchServePorts()
    torchserve = TorchServe(
        args.model_store.resolve(),
        models,
        Path(args.run_dir).resolve(),
        ports,
        predict_workers=args.predict_workers,
    )
    torchserve.start()
    try:
        print(
            f"starting TorchServe (Java) and the workers of {len(models)} model(s) from "
            f"{args.model_store}...",
            flush=True,
        )
        torchserve.wait_ready(timeout=args.ready_timeout)
        print(
            f"TorchServe: gRPC 127.0.0.1:{ports.grpc_inference}, HTTP 127.0.0.1:"
            f"{ports.inference}, metrics http://127.0.0.1:{ports.metrics}/metrics",
            flush=True,
        )
        for line in _served(torchserve, default):
            print(f"  {line}", flush=True)
        print(f"default model: {default} ({why})", flush=True)
        config = gateway_config(
            args,
            upstream=torchserve.grpc_address,
            models=tuple(models),
            default_model=default,
            **gateway_options(torchserve),
        )
        supervisor = Supervisor(torchserve, args.on_backend_exit)
        return asyncio.run(serve(config, supervisor, args.drain_seconds))
    finally:
        print("stopping TorchServe...", flush=True)
        torchserve.stop()


def _served(torchserve: Any, default: str) -> list[str]:
    """One line per served model (version, input, CAM layer, methods), from its workers'
    own ``model_info`` answer: what was loaded, not what the archive's name suggests."""
    import grpc

    from service._proto.saliency.v1 import saliency_pb2 as pb
    from service._proto.torchserve import inference_pb2 as ts_pb
    from service._proto.torchserve import inference_pb2_grpc as ts_grpc
    from service.protocol.catalog import describe, summary
    from service.stack import torchserve_channel

    lines = []
    with torchserve_channel(torchserve) as channel:
        stub = ts_grpc.InferenceAPIsServiceStub(channel)
        for name in torchserve.models:
            request = ts_pb.PredictionsRequest(model_name=name, input={"model_info": b""})
            try:
                info = pb.ModelInfo.FromString(stub.Predictions(request, timeout=60).prediction)
            except grpc.RpcError as exc:
                lines.append(f"{name}: no model_info answer ({exc.code().name})")
                continue
            lines.append(describe(summary(name, info, default=name == default, serving=True)))
    return lines


def add_parser(sub: Any) -> None:
    serve = sub.add_parser(
        "serve", help="TorchServe + gateway serving every archive of a model store"
    )
    serve.add_argument(
        "--model-store",
        type=Path,
        default=DEFAULT_STORE,
        help="folder of .mar archives, each served under its file name (add a model: drop "
        "its archive here and restart); the built-in model is built here when it holds none",
    )
    serve.add_argument(
        "--default",
        action="store_true",
        help="also build (or update) the built-in model's archive in a store that has others",
    )
    serve.add_argument(
        "--default-model",
        metavar="NAME",
        help="the model a request without a model name gets (default: the only one, else "
        "the built-in model, else the first by name)",
    )
    serve.add_argument(
        "--ready-timeout",
        type=float,
        default=600.0,
        help="seconds TorchServe may take to load every model",
    )
    serve.add_argument("--run-dir", default=".cache/run")
    serve.add_argument(
        "--free-torchserve-ports",
        action="store_true",
        help="TorchServe on free loopback ports instead of 8080-8082/7070-7071",
    )
    serve.add_argument(
        "--predict-workers",
        type=int,
        default=None,
        help="workers of the forward-only pool (default: as many as the archive's)",
    )
    serve.add_argument(
        "--on-backend-exit",
        choices=("restart", "exit"),
        default="restart",
        help="when TorchServe dies: start it again with backoff, or exit 1 for a process "
        "manager (Kubernetes, systemd) to restart",
    )
    add_gateway_flags(serve)
    serve.set_defaults(func=cmd_serve)
