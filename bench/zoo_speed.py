"""The zoo's full-size models in the speed bench: gradients against Captum, Grad-CAM and ONNX
Runtime against an eager forward, and the forward-only methods in forwards and seconds.

Run ``python -m bench.zoo_speed`` (``make bench`` runs it too). It writes the section
``## Zoo models at 224 px`` of ``bench/results/speed.md`` (the rest of the file is
``bench.speed``'s and is kept). Per full-size zoo model (random weights from seed 0: speed
depends on the architecture, not the weights), in one process, every measurement of a
group interleaved repeat by repeat (so load from other processes hits all of them alike),
each ratio taken within a repeat and the median over repeats reported:

* **gradients** (batch 8, the predicted class): our ``vanilla_gradient``, ``smoothgrad``
  and ``integrated_gradients`` (the served engine, ``load_bundle`` of a real archive)
  against Captum's ``Saliency``, ``NoiseTunnel(Saliency)`` and ``IntegratedGradients`` (with
  convergence delta, as ours checks completeness) on the model as given, with the same
  number of samples and the same rows per pass (the engine's chunk size); ``grad_cam``
  against one plain eager forward; the ONNX Runtime forward of the archived ``model.onnx``
  against the plain eager forward.
* **perturbation** (one image, each forward-only method at the registry's current
  defaults, read at run time, never written here): forwards per image (the registry's
  count and the rows the ONNX forward actually received), seconds per image, and seconds
  over one batched ONNX Runtime forward of the same chunk (``forward_chunk_size`` rows), timed
  just before the method in the same run; the floor is ``ceil(forwards / chunk)`` such
  forwards. Quality is not reported: with random weights the class evidence is noise, so
  pointing game or deletion AUC would measure nothing.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from captum.attr import IntegratedGradients, NoiseTunnel, Saliency
from torch import nn

from bench.machine import cpu_model, parse_suite_args
from bench.speed import BATCH, NOISE, RESULTS
from bench.speed.cases import Case, CaseResult, random_images
from bench.speed.measure import per_repeat
from bench.speed.report import ZOO_SECTION, fmt, replace_section
from bench.speed.timing import interleave, timed
from bench.zoo import CACHE, SIDE, forwards, served_full
from service.engine.registry import METHODS
from service.models.zoo import IMAGENET_MEAN, IMAGENET_STD, ZOO
from service.runtime.artifacts import ONNX_FILE, ModelBundle
from service.runtime.onnx_forward import OnnxForward, cpu_quota
from service.runtime.ort_choice import OrtSettings
from service.runtime.wrap import Normalized

MODULE = "bench.zoo_speed"
MODELS = ("resnet50", "efficientnet_b0", "convnext_tiny", "vit_s16")
# (label, numerator, denominator): ratios of times taken within a repeat.
RATIOS = (
    ("vanilla gradient / Captum Saliency", "vanilla_gradient", "captum_saliency"),
    ("SmoothGrad / Captum NoiseTunnel (same n, rows)", "smoothgrad", "captum_smoothgrad"),
    ("Integrated Gradients / Captum IG with delta (same n, rows)", "ig", "captum_ig_delta"),
    ("Grad-CAM / plain eager forward", "grad_cam", "forward_eager"),
    ("vanilla gradient / plain eager forward", "vanilla_gradient", "forward_eager"),
    ("ONNX Runtime forward / plain eager forward", "forward_onnx", "forward_eager"),
)


@dataclass
class PerturbRow:
    method: str
    params: str
    registry_forwards: int
    rows_run: int
    seconds: float
    chunk_seconds: float
    chunk: int


def as_given(name: str) -> nn.Module:
    """The zoo model as a user hands it over: pixel space, eval mode, parameters trainable."""
    net = ZOO[name]("full", 1000, SIDE, 0)
    return Normalized(net, IMAGENET_MEAN, IMAGENET_STD).eval().requires_grad_(True)


class CountingForward:
    """The bundle's ONNX forward, counting the rows it is sent (the forwards really run)."""

    def __init__(self, forward: Callable[[np.ndarray], np.ndarray]) -> None:
        self.forward = forward
        self.rows = 0

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        self.rows += int(pixels.shape[0])
        return self.forward(pixels)


@dataclass
class ModelRun:
    result: CaseResult
    chunk: int  # rows per gradient pass (ours and Captum's)
    load_seconds: float
    ort: str  # the ONNX Runtime settings chosen at load, and why


def ort_reason(bundle: ModelBundle) -> str:
    return bundle.ort_choice.reason() if bundle.ort_choice else "defaults (not chosen)"


def gradients(name: str, samples: int, repeats: int) -> ModelRun:
    """Every gradient, CAM and forward measurement on ``name``."""
    start = time.perf_counter()
    bundle = served_full(name, [])
    load_seconds = time.perf_counter() - start
    engine, raw = bundle.engine, as_given(name)
    x = random_images(BATCH, SIDE)
    layer = engine.cam_layer.name if engine.cam_layer else ""
    result = CaseResult(Case(name, name, raw, (3, SIDE, SIDE), layer, x))
    with torch.no_grad():
        targets = raw(x).argmax(dim=1)
    x_np, chunk = x.numpy(), engine.chunk_size

    def eager() -> object:
        with torch.inference_mode():
            return raw(x)

    def ours(method: str, **params: object) -> Callable[[], object]:
        return lambda: engine.explain(x, targets, method, params)  # type: ignore[arg-type]

    saliency, tunnel = Saliency(raw), NoiseTunnel(Saliency(raw))
    integrated = IntegratedGradients(raw)
    fast = {
        "forward_eager": eager,
        "forward_onnx": lambda: bundle.forward(x_np),
        "vanilla_gradient": ours("vanilla_gradient"),
        "captum_saliency": lambda: saliency.attribute(x, target=targets, abs=True),
        "grad_cam": ours("grad_cam"),
    }
    print(f"-- {name}: forwards, vanilla gradient, Grad-CAM (chunk {chunk})", flush=True)
    interleave(result, fast, repeats)
    slow = {
        "smoothgrad": ours("smoothgrad", n_samples=samples, noise_level=NOISE),
        "captum_smoothgrad": lambda: tunnel.attribute(
            x,
            nt_type="smoothgrad",
            nt_samples=samples,
            nt_samples_batch_size=max(1, chunk // BATCH),
            stdevs=NOISE,
            target=targets,
        ),
        "ig": ours("integrated_gradients", n_steps=samples),
        "captum_ig_delta": lambda: integrated.attribute(
            x,
            target=targets,
            n_steps=samples,
            internal_batch_size=chunk,
            return_convergence_delta=True,
        ),
    }
    print(f"-- {name}: SmoothGrad, Integrated Gradients ({samples} samples)", flush=True)
    # No separate warm-up: each call is seconds long and the model ran above already.
    interleave(result, slow, repeats, warm=())
    for label, numerator, denominator in RATIOS:
        result.ratios[label] = per_repeat(result, numerator, denominator)
    return ModelRun(result, chunk, load_seconds, ort_reason(bundle))


def ort_gain(bundle: ModelBundle, name: str, repeats: int) -> list[str]:
    """ms per row of the ONNX forward: the settings chosen at load against the defaults
    (session options as before, the gradient chunk per run), interleaved repeat by repeat."""
    engine = bundle.engine
    default = OrtSettings(cpu_quota(), chunk=engine.chunk_size)
    chosen = bundle.ort_choice.settings if bundle.ort_choice else default
    before = default.forward(CACHE / name / ONNX_FILE)
    image = random_images(1, SIDE).numpy()
    inputs = {s: np.repeat(image, s.chunk, axis=0) for s in (default, chosen)}
    per_row: dict[str, list[float]] = {"default": [], "chosen": [], "io binding": []}
    bound = io_bound(bundle.forward, inputs[chosen])
    runs = {"default": (before, default), "chosen": (bundle.forward, chosen)}
    runs["io binding"] = (lambda _: bound(), chosen)
    for forward, settings in runs.values():
        forward(inputs[settings])  # warm
    for _ in range(repeats):
        for key, (forward, settings) in runs.items():
            batch = inputs[settings]
            per_row[key].append(timed(lambda f=forward, b=batch: f(b)) / settings.chunk)
    ratios = [c / d for c, d in zip(per_row["chosen"], per_row["default"], strict=True)]
    binding = [b / c for b, c in zip(per_row["io binding"], per_row["chosen"], strict=True)]
    return [
        f"ONNX Runtime settings chosen at load: {ort_reason(bundle)}.",
        "",
        f"ONNX Runtime forward, ms per row, interleaved, median of {repeats}: defaults "
        f"({default.label()}, chunk {default.chunk}) "
        f"{statistics.median(per_row['default']) * 1e3:.1f}; chosen at load ({chosen.label()}, "
        f"chunk {chosen.chunk}) {statistics.median(per_row['chosen']) * 1e3:.1f}; chosen / "
        f"defaults {statistics.median(ratios):.2f} (per repeat {fmt(ratios)}); the chosen "
        f"session through IO binding (input bound in place, output into a preallocated "
        f"array) / `session.run`: {statistics.median(binding):.2f} (per repeat {fmt(binding)}).",
    ]


def io_bound(forward: OnnxForward, batch: np.ndarray) -> Callable[[], np.ndarray]:
    """One forward of ``batch`` through IO binding: the input bound where it lies, the
    logits written into an array allocated once."""
    session = forward.session
    name_in, name_out = session.get_inputs()[0].name, session.get_outputs()[0].name
    out = forward(batch[:1]).repeat(batch.shape[0], axis=0)
    binding = session.io_binding()
    binding.bind_cpu_input(name_in, batch)
    binding.bind_output(name_out, "cpu", 0, np.float32, list(out.shape), out.ctypes.data)

    def run() -> np.ndarray:
        session.run_with_iobinding(binding)
        return out

    return run


def perturbation(name: str, repeats: int) -> tuple[list[PerturbRow], list[str]]:
    """Each forward-only method at its registry defaults on one image of ``name``, and what
    the ONNX Runtime settings chosen at load buy per row."""
    bundle = served_full(name, [])
    gain = ort_gain(bundle, name, repeats)
    engine = bundle.engine
    counting = CountingForward(bundle.forward)
    engine.forward_numpy = counting
    image = random_images(1, SIDE)
    chunk = engine.forward_chunk_size
    chunk_np = np.repeat(image.numpy(), chunk, axis=0)
    rows = []
    for spec in METHODS.members():
        if not spec.forward_only or engine.unavailable_reason(spec) is not None:
            continue
        bundle.forward(chunk_np)  # warm
        chunk_seconds = statistics.median(timed(lambda: bundle.forward(chunk_np)) for _ in range(3))
        counting.rows = 0
        start = time.perf_counter()
        engine.explain(image, None, spec.name)
        seconds = time.perf_counter() - start
        defaults = spec.params.resolve({})
        rows.append(
            PerturbRow(
                spec.name,
                ", ".join(f"{k}={v}" for k, v in defaults.items()),
                forwards(spec, {}),
                counting.rows,
                seconds,
                chunk_seconds,
                chunk,
            )
        )
        print(f"{name} {spec.name}: {seconds:.1f} s, {counting.rows} rows", flush=True)
    return rows, gain


def gradient_lines(runs: list[ModelRun], samples: int) -> list[str]:
    lines = [
        f"Batch {BATCH}, the predicted class; SmoothGrad and IG with {samples} samples/steps "
        "(ours and Captum alike; rows per pass = the engine's chunk size for both); seconds "
        "per call, median over repeats.",
        "",
        "| model | chunk | load s | eager fwd | ORT fwd | vanilla | Captum Saliency | Grad-CAM "
        "| SmoothGrad | Captum NT | IG | Captum IG+delta |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    keys = (
        "forward_eager",
        "forward_onnx",
        "vanilla_gradient",
        "captum_saliency",
        "grad_cam",
        "smoothgrad",
        "captum_smoothgrad",
        "ig",
        "captum_ig_delta",
    )
    for run in runs:
        cells = " | ".join(f"{statistics.median(run.result.times[k]):.3f}" for k in keys)
        lines.append(
            f"| `{run.result.case.key}` | {run.chunk} | {run.load_seconds:.0f} | {cells} |"
        )
    lines += [
        "",
        "| ratio (within a repeat), median [per repeat] | "
        + " | ".join(f"`{run.result.case.key}`" for run in runs)
        + " |",
        "|---|" + "---|" * len(runs),
    ]
    for label, *_ in RATIOS:
        cells = " | ".join(
            f"{statistics.median(run.result.ratios[label]):.2f} [{fmt(run.result.ratios[label])}]"
            for run in runs
        )
        lines.append(f"| {label} | {cells} |")
    lines += ["", "ONNX Runtime settings chosen at load (`service.runtime.ort_choice`):", ""]
    lines += [f"- `{run.result.case.key}`: {run.ort}" for run in runs]
    return lines


def perturbation_lines(name: str, rows: list[PerturbRow], gain: list[str]) -> list[str]:
    lines = [
        f"### Forward-only methods on `{name}`, one image, registry defaults",
        "",
        f"One call per method (seconds each); chunk = {rows[0].chunk} rows per ONNX Runtime "
        "forward (the engine's forward chunk, chosen at load); `chunk fwd` = one batched "
        "forward of that chunk, median of 3 blocks timed just before the method; "
        "`in chunk fwds` = seconds / chunk fwd; floor = ceil(rows / chunk) chunk forwards; "
        "over floor = seconds / floor.",
        "",
        *gain,
        "",
        "| method | defaults | forwards (registry) | rows run | seconds / image "
        "| chunk fwd ms | in chunk fwds | floor | over floor |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        floor = math.ceil(row.rows_run / row.chunk)
        in_chunks = row.seconds / row.chunk_seconds
        lines.append(
            f"| `{row.method}` | {row.params} | {row.registry_forwards} | {row.rows_run} | "
            f"{row.seconds:.2f} | {row.chunk_seconds * 1e3:.1f} | {in_chunks:.1f} | {floor} | "
            f"{in_chunks / floor:.2f} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(ZOO))
    parser.add_argument("--perturb-models", nargs="*", default=["efficientnet_b0"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--samples", type=int, default=4, help="SmoothGrad samples, IG steps")
    args, rerun = parse_suite_args(parser, MODULE, RESULTS, argv)
    if rerun is not None:
        return rerun
    torch.set_num_threads(cpu_quota())
    warnings.filterwarnings("ignore", message="Input Tensor 0 did not already require")
    begin, load_before = time.perf_counter(), os.getloadavg()[0]
    runs = [gradients(name, args.samples, args.repeats) for name in args.models]
    load_mid = os.getloadavg()[0]
    tables = {name: perturbation(name, args.repeats) for name in args.perturb_models}
    minutes = (time.perf_counter() - begin) / 60
    command = "python -m bench.zoo_speed " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        ZOO_SECTION,
        "",
        f"- `{command.strip()}`, {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC, "
        f"{minutes:.1f} min in all; {cpu_model()}, torch threads {torch.get_num_threads()}, "
        f"OMP_WAIT_POLICY={args.omp_wait_policy}; load average {load_before:.2f} at the start, "
        f"{load_mid:.2f} after the gradients, {os.getloadavg()[0]:.2f} at the end (other "
        "helpers share the 2 cores: compare the ratios, taken within one repeat)",
        "- random weights (seed 0), published configurations at 224 px, archived and loaded "
        "as a TorchServe worker loads them (`bench.zoo.served_full`: optimiser, chunk size, "
        "precision guard, ONNX forward); `load s` = archive load incl. those choices",
        f"- median of {args.repeats} interleaved repeats, after one warm-up for the fast group",
        "",
        *(gradient_lines(runs, args.samples) if runs else []),
        "",
    ]
    for name, (rows, gain) in tables.items():
        lines += [*perturbation_lines(name, rows, gain), ""]
    lines.append(
        "Quality is not in these tables: the weights are random, so the pointing game or "
        "deletion AUC would score noise; `bench/results/quality.md` has quality on the "
        "trained default model."
    )
    replace_section(args.out, ZOO_SECTION, lines)
    return 0


if __name__ == "__main__":
    # Exit only on failure: bench.run runs suites in one process via runpy.
    if code := main():
        sys.exit(code)
