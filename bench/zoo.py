"""The zoo: explain latency of every method on every full-size architecture, and the
two-halves table.

Run ``python -m bench.zoo`` (``make bench`` runs it too). Two tables in
``bench/results/zoo.md``:

* **latency**: each zoo model at its published size, 224 px, archived with the real
  ``archive`` path (ONNX parity, CAM layer and attention found) and loaded as a TorchServe
  worker loads it (``load_bundle``: optimiser, chunk size); each available method with its
  default parameters explains one image (batch 1, the predicted class) in process: the
  median of ``--repeats`` calls after a warm-up call, or that first call alone when it
  took over 10 s (occlusion, RISE, Sobol: thousands of forwards, where one more warm-up
  changes nothing). Torch threads: all the machine's. ``--max-forwards N`` runs a
  forward-only method whose defaults need more than N forwards with fewer samples (the
  parameter in :data:`SAMPLES`), and reports that time scaled to the default count, marked
  ``~``, beside what was run: these methods' time is their forwards (batched in chunks),
  so it scales linearly with the count.
* **two halves** (:mod:`tests.engine.two_halves`): per method and architecture, on the
  two-halves constructions, with default parameters, whether the map's maximum is on the
  half the explained class reads (cases out of 4: two images x classes A and B) and the
  mean share of its positive mass there. What a method's definition implies there is what
  ``tests/engine/test_two_halves.py`` asserts; this table reports the numbers.

Archives are cached in ``.cache/bench-zoo`` (rebuilt when absent).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import sys
import time
import zipfile
from pathlib import Path

import torch

from bench.machine import cpu_model, parse_suite_args, write_report
from service.archive import BatchConfig, build_archive
from service.engine.engine import Engine
from service.engine.registry import METHODS, MethodSpec
from service.models.zoo import IMAGENET_MEAN, IMAGENET_STD, ZOO, eager_spec
from service.protocol.errors import InvalidInputError
from service.runtime.artifacts import ModelBundle, load_bundle

RESULTS = Path(__file__).resolve().parent / "results" / "zoo.md"
CACHE = Path(__file__).resolve().parents[1] / ".cache" / "bench-zoo"
SIDE = 224
LONG_S = 10.0  # a method whose first call takes longer is timed by that call alone
LABELS = [f"class_{i}" for i in range(1000)]
# The parameter that sets how many forwards a forward-only method makes, and how to lower
# it: a count scaled down, or (occlusion) a stride raised up to the window.
SAMPLES = {"rise": "n_masks", "lime": "n_samples", "kernel_shap": "n_samples", "sobol": "n_designs"}


def forwards(spec: MethodSpec, params: dict[str, object]) -> int:
    """Forwards ``spec`` makes with ``params`` at 224 px (InvalidInputError: not valid)."""
    shape = (3, SIDE, SIDE)
    return spec.cost(spec.resolve_params(params, shape), shape).forwards


def capped(spec: MethodSpec, cap: int | None) -> dict[str, object]:
    """Parameters that keep ``spec`` within ``cap`` forwards: ``{}`` (the defaults) when
    they already do, or when no parameter of ``spec`` sets its number of forwards."""
    if cap is None or forwards(spec, {}) <= cap:
        return {}
    defaults = spec.params.resolve({})
    if spec.name == "occlusion":
        window = int(defaults["window"])
        strides = range(int(defaults["stride"]) + 1, window + 1)
        return next(
            ({"stride": s} for s in strides if forwards(spec, {"stride": s}) <= cap),
            {"stride": window},
        )
    if spec.name not in SAMPLES:
        return {}
    name = SAMPLES[spec.name]
    counts = {}
    for count in range(int(defaults[name]), 0, -1):
        try:
            counts[count] = forwards(spec, {name: count})
        except InvalidInputError:  # not a value it accepts (Sobol: powers of two)
            continue
    within = [c for c, n in counts.items() if n <= cap]
    return {name: within[0] if within else min(counts)}  # else: the fewest it accepts


def full_archive(name: str, say: list[str]) -> Path:
    """The full-size model ``name``'s archive in ``CACHE / "store"`` (built when absent)."""
    mar = CACHE / "store" / f"{name}.mar"
    if mar.exists():
        return mar
    return build_archive(
        name=name,
        eager=eager_spec(name, "full", len(LABELS), SIDE),
        exported=None,
        labels=LABELS,
        input_size=(3, SIDE, SIDE),
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        target_layer=None,
        out_dir=CACHE / "store",
        batch=BatchConfig(workers=1),
        say=say.append,
    )


def served_full(name: str, say: list[str]) -> ModelBundle:
    """The full-size model ``name`` archived (cached) and loaded as a worker loads it."""
    folder = CACHE / name
    if not (folder / "model.json").exists():
        with zipfile.ZipFile(full_archive(name, say)) as packed:
            packed.extractall(folder)
    return load_bundle(folder)


def timed(engine: Engine, image: torch.Tensor, method: str, params: dict[str, object]) -> float:
    start = time.perf_counter()
    engine.explain(image, None, method, params)
    return time.perf_counter() - start


def latency(names: list[str], repeats: int, cap: int | None) -> list[str]:
    methods = METHODS.members()
    rows = [
        "| method | " + " | ".join(names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    cells: dict[str, dict[str, str]] = {spec.name: {} for spec in methods}
    layers = []
    reduced = []
    image = torch.rand(1, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(0))
    for name in names:
        said: list[str] = []
        engine = served_full(name, said).engine
        layer = engine.cam_layer.summary("model.") if engine.cam_layer else "none"
        layers.append(f"- `{name}`: CAM layer {layer}; chunk {engine.chunk_size} rows/pass")
        for spec in methods:
            reason = engine.unavailable_reason(spec)
            if reason is not None:
                cells[spec.name][name] = "n/a"
                continue
            params = capped(spec, cap)
            times = [timed(engine, image, spec.name, params)]  # the first call also warms up
            while len(times) < repeats + 1 and sum(times) < LONG_S:
                times.append(timed(engine, image, spec.name, params))
            times = times[1:] or times  # a call past LONG_S is timed once, cold
            ms = 1000 * statistics.median(times)
            cells[spec.name][name] = f"{ms:,.0f}"
            if params:
                run, default = forwards(spec, params), forwards(spec, {})
                cells[spec.name][name] = f"~{ms * default / run:,.0f}"
                reduced.append(
                    f"| `{name}` | `{spec.name}` | {params} | {run} of {default} | {ms:,.0f} |"
                )
            print(f"{name} {spec.name} {params}: {ms:,.0f} ms", flush=True)
    for spec in methods:
        rows.append(f"| `{spec.name}` | " + " | ".join(cells[spec.name][n] for n in names) + " |")
    if reduced:
        rows += [
            "",
            f"`~`: run with at most {cap} forwards (`--max-forwards`), the time scaled to the "
            "default count; what was run:",
            "",
            "| model | method | parameters | forwards run | ms |",
            "|---|---|---|---:|---:|",
            *reduced,
        ]
    return [*rows, "", *layers]


def two_halves(names: list[str]) -> list[str]:
    from tests.engine.two_halves import (
        SIZE,
        half_scores,
        two_halves_engine,
        two_halves_vit_engine,
    )

    engines = {name: two_halves_engine(name) for name in names}
    engines.update({f"{n} (masked)": two_halves_vit_engine(n) for n in names if "vit" in n})
    columns = list(engines)
    rows = ["| method | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    x = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    for spec in METHODS.members():
        cells = []
        for column in columns:
            engine = engines[column]
            if engine.unavailable_reason(spec) is not None:
                cells.append("n/a")
                continue
            scores = [
                score
                for target in (0, 1)
                for score in half_scores(
                    engine.explain(x, [target, target], spec.name, seed=3).maps,
                    target,
                )
            ]
            hits = sum(s.own_max > s.other_max for s in scores)
            share = statistics.fmean(s.own_fraction for s in scores)
            cells.append(f"{hits}/{len(scores)}, {share:.2f}")
        rows.append(f"| `{spec.name}` | " + " | ".join(cells) + " |")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(ZOO), choices=list(ZOO))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument(
        "--max-forwards",
        type=int,
        default=None,
        help="run forward-only methods with at most this many forwards; scale their time",
    )
    args, rerun = parse_suite_args(parser, "bench.zoo", RESULTS, argv)
    if rerun is not None:
        return rerun
    command = "python -m bench.zoo " + " ".join(sys.argv[1:] if argv is None else argv)
    lines = [
        "# Zoo: explain latency at 224 px and the two-halves check",
        "",
        f"- {dt.date.today()}, `{command.strip()}`; {cpu_model()}, "
        f"{torch.get_num_threads()} torch threads, OMP_WAIT_POLICY={args.omp_wait_policy}, "
        f"load average {os.getloadavg()[0]:.1f} at the start (other work shares the cores)",
        "",
    ]
    if not args.skip_latency:
        lines += [
            "## Explain latency, ms (batch 1, default parameters, median of "
            f"{args.repeats}; n/a: the model cannot run it)",
            "",
            *latency(args.models, args.repeats, args.max_forwards),
            "",
        ]
    lines += [
        "## Two halves: maximum on the class's half (cases), mean positive-mass share there",
        "",
        "Tiny models at 64 px; `(masked)`: the ViT on the whole image with attention masked "
        "per half, where the attention methods run. `tests/engine/test_two_halves.py` says "
        "what each method's definition implies and asserts only that. LIME and KernelSHAP: SLIC "
        "finds one superpixel in these uniform-noise images, so their maps are flat or 0 "
        "here (no case), which says nothing of them on natural images.",
        "",
        *two_halves(args.models),
    ]
    write_report(args.out, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
