"""Anytime maps: how soon a stream shows a slow method's first map, against its final map.

Run ``python -m bench.anytime`` (``make bench`` runs it too); the table goes to
``bench/results/anytime.md``. Through the real stack (TorchServe + gateway, the default
archive): per method, ``--repeats`` ``ExplainStream`` calls on held-out images, each timed
from the call to its first ``refinement`` part and to its ``explanation`` part; beside
them, alternated call by call (so that machine load falls on both alike), the unary
``Explain`` of the same request, which builds no anytime map. The encoding overhead is
the ``refine`` stage the worker reports (resizing and encoding the maps that went out),
as a share of the method's own ``explain`` stage. ``--zoo NAME`` serves a full-size
zoo model (224 px, random weights, archived as ``bench.zoo`` does) instead.
"""

from __future__ import annotations

import argparse
import datetime as dt
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np

from bench import zoo
from bench.e2e.load import make_requests
from bench.machine import cpu_model, exit_code, parse_suite_args, write_report
from service._proto.saliency.v1 import saliency_pb2 as pb
from service._proto.saliency.v1 import saliency_pb2_grpc as pb_grpc
from service.archive import BatchConfig, build_default_archive
from service.client.messages import CHANNEL_OPTIONS
from service.protocol.names import METHODS
from service.stack import running_stack

RESULTS = Path(__file__).resolve().parent / "results" / "anytime.md"
SLOW = ("occlusion", "rise")
FIRST_MAP_FORWARDS = 32  # issue 13: a stream's first map after at most this many forwards


def stage(timings: list[pb.StageTiming], name: str) -> float:
    return sum(t.seconds for t in timings if t.stage == name)


def streamed(stub: pb_grpc.ExplainServiceStub, request: pb.ExplainRequest) -> dict[str, float]:
    """One ``ExplainStream``: seconds to the first refinement and to the explanation, the
    first refinement's forwards and the refinements' count, the worker's stages."""
    start = time.perf_counter()
    out = {"refinements": 0.0}
    for part in stub.ExplainStream(request, timeout=600):
        now = time.perf_counter() - start
        kind = part.WhichOneof("part")
        if kind == "refinement":
            if not out["refinements"]:
                out["first"] = now
                out["first_forwards"] = part.refinement.forwards
                out["forwards_total"] = part.refinement.forwards_total
            out["refinements"] += 1
        elif kind == "explanation":
            out["final"] = now
        elif kind == "summary":
            out["refine"] = stage(part.summary.timings, "refine")
            out["explain"] = stage(part.summary.timings, "explain")
    return out


def unary(stub: pb_grpc.ExplainServiceStub, request: pb.ExplainRequest) -> float:
    start = time.perf_counter()
    stub.Explain(request, timeout=600)
    return time.perf_counter() - start


def ms(values: list[float], digits: int = 0) -> str:
    return f"{1000 * float(np.median(values)):.{digits}f}" if values else "-"


def row(method: str, calls: list[tuple[dict[str, float], float]]) -> tuple[str, int]:
    """The table row of one method's calls, and the most forwards before a first map."""
    streams = [s for s, _ in calls]
    got = [s for s in streams if "first" in s]
    first_forwards = max((int(s["first_forwards"]) for s in got), default=0)
    ceiling = int(got[0]["forwards_total"]) if got else 0
    share = 100 * sum(s["refine"] for s in streams) / sum(s["explain"] for s in streams)
    cells = [
        method,
        f"{first_forwards} of {ceiling}",
        ms([s["first"] for s in got]),
        ms([s["final"] for s in streams]),
        ms([u for _, u in calls]),
        f"{np.mean([s['refinements'] for s in streams]):.1f}",
        f"{ms([s['refine'] for s in streams], 1)} ({share:.1f} %)",
        str(len(streams) - len(got)),
    ]
    return "| " + " | ".join(cells) + " |", first_forwards if got else 10**9


def measure(address: str, requests: list[pb.ExplainRequest], repeats: int) -> tuple[list[str], int]:
    """The table rows of every slow method (``repeats`` streams and unary calls each), and
    the most forwards any stream spent before its first map."""
    channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
    stub = pb_grpc.ExplainServiceStub(channel)
    rows, worst = [], 0
    for method in SLOW:
        for request in requests:
            del request.methods[:]
            request.methods.append(pb.MethodRequest(method=METHODS.number(method)))  # type: ignore[arg-type]
        streamed(stub, requests[0]), unary(stub, requests[0])  # warm up
        calls = []
        for i in range(repeats):
            request = requests[i % len(requests)]
            if i % 2:  # alternate which call goes first
                calls.append((streamed(stub, request), unary(stub, request)))
            else:
                alone = unary(stub, request)
                calls.append((streamed(stub, request), alone))
        line, first_forwards = row(method, calls)
        rows.append(line)
        worst = max(worst, first_forwards)
    channel.close()
    return rows, worst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=12)
    parser.add_argument("--zoo", help="a full-size zoo model instead of the default model")
    args, code = parse_suite_args(parser, "bench.anytime", RESULTS, argv)
    if code is not None:
        return code
    with tempfile.TemporaryDirectory(prefix="bench-anytime-") as tmp:
        if args.zoo:  # random weights: only the time matters
            mar = zoo.full_archive(args.zoo, [])
            store, models, side = mar.parent, {args.zoo: mar.name}, zoo.SIDE
        else:
            store, models, side = Path(tmp), {"shapes": "shapes.mar"}, 128
            build_default_archive(store, batch=BatchConfig())
        requests = make_requests(8, side)
        for request in requests:
            request.model = next(iter(models))
        with running_stack(store, models) as stack:
            rows, worst = measure(stack.gateway.address, requests, args.repeats)
    ok = worst <= FIRST_MAP_FORWARDS
    model = args.zoo or "shapes (default model)"
    lines = [
        "# Anytime maps: time to the first map against time to the final map",
        "",
        f"{dt.date.today()}, {cpu_model()}, model {model} ({side} px), through TorchServe and",
        f"the gateway; medians of {args.repeats} calls per method, one image per call (the",
        "predicted class, default parameters). Command: `python -m bench.anytime"
        + (f" --zoo {args.zoo}" if args.zoo else "")
        + f" --repeats {args.repeats}`.",
        "",
        "| method | first map: forwards of the ceiling | first map ms | final map ms "
        "| unary Explain ms | refinements per stream | refine (encode) ms, share of explain "
        "| streams without a refinement |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "*first map* and *final map*: from the call to the stream's first `refinement` part "
        "and to its `explanation` part, at the client. *unary Explain*: the same request "
        "alone, alternated call by call with the stream; it builds no anytime map. *refine*: "
        "the worker's time resizing and encoding the refinements that went out (the stage "
        f"of that name in the summary's timings). Bar: the first map after at most "
        f"{FIRST_MAP_FORWARDS} forwards: {'met' if ok else 'MISSED'}.",
        "",
    ]
    write_report(args.out, lines)
    return exit_code(ok, args)


if __name__ == "__main__":
    raise SystemExit(main())
