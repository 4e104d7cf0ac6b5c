"""End to end over gRPC (gateway -> TorchServe -> engine) against the engine in process."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.e2e import MODEL, MODULE, RESULTS
from bench.e2e.clients import ClientProcess
from bench.e2e.load import (
    CpuProbe,
    Load,
    Paired,
    Sweep,
    cpu_probe,
    grpc_load,
    inprocess_load,
    make_requests,
    show,
)
from bench.e2e.memory import sustained
from bench.e2e.report import write
from bench.e2e.servers import SWEEP, build_base_archive, config_name, deploy, parse_config, variant
from bench.machine import exit_code, parse_suite_args
from service._proto.saliency.v1 import saliency_pb2 as pb
from service.archive import BatchConfig
from service.launcher import TorchServe
from service.runtime.artifacts import load_bundle
from service.runtime.onnx_forward import cpu_quota
from service.serving.pipeline import Explainer
from service.stack import gateway_options, running_gateway, running_torchserve


def run(
    seconds: float,
    warmup: float,
    minutes: float,
    out: Path,
    sweep: bool,
    confirm: Sequence[BatchConfig] = (),
    rounds: int = 3,
    settings: Mapping[str, str] | None = None,
    serve_warmup: float = 30.0,
) -> bool:
    """Build the archive, serve it, measure it in process and end to end; write the table."""
    torch.set_num_threads(cpu_quota())
    setup: list[str] = []
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmp:
        store = Path(tmp) / "model-store"
        store.mkdir()
        began = time.perf_counter()
        base, model_title = build_base_archive(store, BatchConfig())
        setup.append(f"archive {time.perf_counter() - began:.0f} s")
        model_dir = Path(tmp) / "model-dir"
        with zipfile.ZipFile(base) as archive:
            archive.extractall(model_dir)
        size = json.loads((model_dir / "model.json").read_text())["input_size"][-1]
        requests = make_requests(32, int(size))

        began = time.perf_counter()
        with running_torchserve(
            store,
            {MODEL: base.name},
            Path(tmp) / "ts-run",
            # The sweep registers configurations in turn through the management API, which
            # TorchServe >= 0.11 only allows when enabled (on loopback, for this run only).
            settings={"enable_model_api": "true", **(settings or {})},
            ready_timeout=300,
            split_pools=False,  # one pool: the sweep measures each configuration alone
        ) as ts:
            setup.append(f"TorchServe start {time.perf_counter() - began:.0f} s")

            # In process first, while TorchServe's worker sits idle.
            print("in process", flush=True)
            explainer = Explainer(load_bundle(model_dir))
            inproc = {
                b: show(f"batch {b}", inprocess_load(explainer, requests, b, seconds))
                for b in (1, 8, 16)
            }

            with (
                running_gateway(
                    ts.grpc_address, [MODEL], health_interval_s=1.0, **gateway_options(ts)
                ) as gateway,
                ClientProcess() as apart,
            ):
                served = Served(ts, gateway.address, base, requests, seconds, warmup, apart)
                served.warm(serve_warmup)
                setup.append(f"served path warmed up {serve_warmup:g} s at 8 clients, unmeasured")
                sweeps = [served.default_configuration()]
                paired = served.paired_rounds(explainer, rounds)
                del explainer
                # Sustained run on the default configuration: worker memory over time.
                print(f"sustained run, {minutes:g} min", flush=True)
                memory = sustained(ts, gateway.address, requests, minutes, apart)
                sweeps += [served.configuration(config) for config in (SWEEP if sweep else ())]
                confirmations = [served.ab_rounds(candidate) for candidate in confirm]
    return write(
        out,
        model_title,
        setup,
        inproc,
        sweeps,
        memory,
        minutes,
        (load_before, os.getloadavg()[0]),
        confirmations,
        paired,
        settings or {},
    )


@dataclass
class Served:
    """The served model under test: what each end-to-end measurement needs."""

    ts: TorchServe
    address: str
    base: Path  # the default configuration's archive
    requests: Sequence[pb.ExplainRequest]
    seconds: float
    warmup: float
    apart: ClientProcess  # where the clients run, but where a measurement says otherwise

    def loads(self, levels: Sequence[int], probe: CpuProbe | None = None) -> dict[int, Load]:
        """Throughput and latency at each number of concurrent clients in ``levels``."""
        return {
            c: show(
                f"{c} clients",
                grpc_load(
                    self.address, self.requests, c, self.seconds, self.warmup, probe, self.apart
                ),
            )
            for c in levels
        }

    def warm(self, seconds: float) -> None:
        """8 clients for ``seconds``, unmeasured: TorchServe's frontend is a JVM, whose JIT
        compiles the request path during its first thousands of calls (its CPU per request
        fell from 2-3 ms in the first minute to 0.7 ms in the third, bench/results/e2e.md);
        a server runs warm, and the engine in process has no such phase to pass."""
        print(f"warming the served path up, {seconds:g} s", flush=True)
        load = grpc_load(self.address, self.requests, 8, seconds, 0.0, apart=self.apart)
        show("warm-up, 8 clients", load)

    def default_configuration(self) -> Sweep:
        print("end to end, default configuration", flush=True)
        return Sweep(BatchConfig(), 0.0, self.loads((1, 8, 16), cpu_probe(self.ts)))

    def configuration(self, config: BatchConfig) -> Sweep:
        """``config`` registered in place of what was served, then measured."""
        print(f"configuration {config_name(config)}", flush=True)
        took = deploy(self.ts, variant(self.base, config), config)
        return Sweep(config, took, self.loads((1, 8, 16) if config.batch_size == 1 else (8, 16)))

    def paired_rounds(self, explainer: Explainer, rounds: int) -> list[Paired]:
        """In process at batch 16 and gRPC at 8 clients, back to back ``rounds`` times.

        On a shared machine the load of the moment moves both figures; a pair measured
        seconds apart shares it, so the throughput bar is the median of the pairs' ratios.
        gRPC is measured twice a round: clients in their own process (the bar), and in the
        gateway's (the way this bench measured before, for comparison).
        """
        pairs = []
        for index in range(rounds):
            print(f"paired round {index + 1} of {rounds}", flush=True)
            alone = show(
                "in process, batch 16", inprocess_load(explainer, self.requests, 16, self.seconds)
            )
            served = [
                show(
                    f"gRPC, 8 clients, {label}",
                    grpc_load(
                        self.address, self.requests, 8, self.seconds, self.warmup, probe, apart
                    ),
                )
                for label, apart in (("own process", self.apart), ("gateway's process", None))
                for probe in [cpu_probe(self.ts)]
            ]
            pairs.append(Paired(alone, *served))
        return pairs

    def ab_rounds(self, candidate: BatchConfig, rounds: int = 2) -> list[Sweep]:
        """The default configuration and ``candidate``, deployed in turn ``rounds`` times each.

        Configurations measured one after another on a shared machine differ by the load of
        the moment as much as by themselves; alternating them puts both under the same load.
        """
        measured = []
        for _ in range(rounds):
            for config in (BatchConfig(), candidate):
                print(f"A/B {config_name(config)}", flush=True)
                took = deploy(self.ts, variant(self.base, config), config)
                measured.append(Sweep(config, took, self.loads((8, 16))))
        return measured


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="measured window per load")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured lead-in per load")
    parser.add_argument("--minutes", type=float, default=1.0, help="sustained run (memory)")
    parser.add_argument("--no-sweep", action="store_true", help="default configuration only")
    parser.add_argument(
        "--rounds", type=int, default=3, help="paired rounds: in process, then gRPC, in turn"
    )
    parser.add_argument(
        "--confirm",
        action="append",
        default=[],
        metavar="bB-dD-wW",
        help="A/B a configuration against the default, alternating (e.g. b8-d5-w2)",
    )
    parser.add_argument(
        "--ts-setting",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an extra config.properties entry for TorchServe (e.g. number_of_netty_threads=1)",
    )
    parser.add_argument(
        "--serve-warmup",
        type=float,
        default=30.0,
        help="seconds of unmeasured load on the served path before its first measurement",
    )
    args, rerun = parse_suite_args(parser, MODULE, RESULTS, argv)
    if rerun is not None:
        return rerun
    confirm = [parse_config(text) for text in args.confirm]
    settings = dict(text.split("=", 1) for text in args.ts_setting)
    ok = run(
        args.seconds,
        args.warmup,
        args.minutes,
        args.out,
        not args.no_sweep,
        confirm,
        args.rounds,
        settings,
        args.serve_warmup,
    )
    return exit_code(ok, args)


if __name__ == "__main__":
    # Exit only on failure: bench.run runs suites in one process via runpy.
    if code := main():
        sys.exit(code)
