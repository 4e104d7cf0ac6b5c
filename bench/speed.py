"""Speed of the gradient methods and the forwards, side by side with eager torch and Captum.

Run ``python -m bench.speed`` (``make bench`` runs it too). Two models: a ResNet-18 layout
at 224x224 (random weights: speed depends on the architecture, not the weights) and the
default model (trained weights when its cache exists, else its architecture untrained).
On each, in one process, batch 8, every measurement interleaved repeat by repeat so that
load from other processes hits all of them alike, each ratio taken within a repeat and
the median over repeats reported:

* plain eager forward of the model as given (``inference_mode``), of our optimised copy
  (:func:`service.runtime.optimize.optimize_for_inference`), and ONNX Runtime (the
  artifact the archive ships, through :class:`service.runtime.onnx_forward.OnnxForward`)
  at batch 1 and 8;
* our ``vanilla_gradient`` (the engine on the optimised model) against Captum's
  ``Saliency`` on the model as given, and against the plain forward;
* our ``smoothgrad`` (16 samples) and ``integrated_gradients`` (16 steps) against Captum's
  ``NoiseTunnel(Saliency)`` and ``IntegratedGradients`` at the best of several batch
  settings, found first on the same run;
* ``grad_cam`` against the plain forward;
* activation memory per image (bytes autograd keeps for one input gradient) and the rows
  per pass (chunk size) chosen on this device.

Writes ``bench/results/speed.md``; exits 1 on a missed bar only with ``--strict`` (so that
``bench.run`` goes on to the next suite).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as dt
import io
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import captum
import numpy as np
import onnxruntime as ort
import torch
from captum.attr import IntegratedGradients, NoiseTunnel, Saliency
from torch import nn

from bench.machine import (
    add_omp_policy_argument,
    bf16_units,
    cpu_model,
    rerun_with_omp_policy,
    write_report,
)
from bench.resnet import TARGET_LAYER as RESNET_LAYER
from bench.resnet import resnet18_pixels
from service.engine.engine import Engine
from service.runtime.onnx_forward import OnnxForward, cpu_quota
from service.runtime.optimize import (
    OptimizeReport,
    activation_bytes_per_image,
    choose_chunk_size,
    optimize_for_inference,
)

MODULE = "bench.speed"
RESULTS = Path(__file__).resolve().parent / "results" / "speed.md"
BATCH = 8
SAMPLES = 16  # SmoothGrad samples and Integrated Gradients steps
NOISE = 0.15
CAPTUM_ROWS = (8, 32, 128)  # rows per pass Captum is tried with (its batch settings)
MEMORY_BUDGET = 1 << 30  # activations of one pass, ours (chunk size) and Captum's alike
PAUSE = 0.05  # seconds between timed calls
# A timed figure is the mean call time over a block of back-to-back calls lasting at least
# this long (one call for anything slower). A lone call of a few milliseconds, right after
# a different workload and a pause, pays for cold caches and sleeping threads: on the
# default model (6 ms forwards) that alone moved single-call ratios by 10-20% from repeat
# to repeat, for the plain forward and the gradient alike.
MIN_BLOCK = 0.05


@dataclass(frozen=True)
class Bar:
    """``numerator / denominator`` must be ``<= limit`` (or ``>= limit`` when ``at_least``)."""

    name: str
    numerator: str
    denominator: str
    limit: float
    at_least: bool = False

    def met(self, ratio: float) -> bool:
        return ratio >= self.limit if self.at_least else ratio <= self.limit

    def text(self) -> str:
        return f"{'>=' if self.at_least else '<='} {self.limit:g}"


BF16 = ", bfloat16"
BARS = (
    Bar("vanilla gradient / Captum Saliency", "vanilla_gradient", "captum_saliency", 0.75),
    Bar("vanilla gradient / plain eager forward", "vanilla_gradient", "forward_eager", 1.8),
    Bar("SmoothGrad 16 / Captum NoiseTunnel (best batch)", "smoothgrad", "captum_smoothgrad", 0.75),
    Bar(
        "Integrated Gradients 16 / Captum IG with delta (best batch)",
        "integrated_gradients",
        "captum_ig_delta",
        0.75,
    ),
    Bar("Grad-CAM / plain eager forward", "grad_cam", "forward_eager", 1.15),
    # the same bars with the torch methods under bfloat16 autocast
    Bar(
        f"vanilla gradient / Captum Saliency{BF16}",
        "vanilla_gradient_bf16",
        "captum_saliency",
        0.75,
    ),
    Bar(
        f"vanilla gradient / plain eager forward{BF16}",
        "vanilla_gradient_bf16",
        "forward_eager",
        1.8,
    ),
    Bar(
        f"SmoothGrad 16 / Captum NoiseTunnel (best batch){BF16}",
        "smoothgrad_bf16",
        "captum_smoothgrad_b",
        0.75,
    ),
    Bar(
        f"Integrated Gradients 16 / Captum IG with delta (best batch){BF16}",
        "integrated_gradients_bf16",
        "captum_ig_delta_b",
        0.75,
    ),
    Bar(f"Grad-CAM / plain eager forward{BF16}", "grad_cam_bf16", "forward_eager", 1.15),
    Bar("eager forward / ONNX Runtime, batch 8", "forward_eager", "forward_onnx", 1.6, True),
    Bar("eager forward / ONNX Runtime, batch 1", "forward_eager_1", "forward_onnx_1", 1.6, True),
)
INFO_RATIOS = (
    (
        "vanilla gradient / optimised eager forward (FLOP floor 2.0)",
        "vanilla_gradient",
        "forward_opt",
    ),
    ("optimised eager forward / plain eager forward", "forward_opt", "forward_eager"),
    (
        "vanilla gradient, optimised / same engine on the model as loaded",
        "vanilla_gradient",
        "vanilla_gradient_plain",
    ),
    ("Captum Saliency / plain eager forward", "captum_saliency", "forward_eager"),
    (
        "Integrated Gradients 16 / Captum IG without delta (best batch)",
        "integrated_gradients",
        "captum_ig",
    ),
    ("optimised eager forward / ONNX Runtime, batch 8", "forward_opt", "forward_onnx"),
    ("vanilla gradient, bfloat16 / float32", "vanilla_gradient_bf16", "vanilla_gradient"),
)


@dataclass
class Case:
    """A model to benchmark, as a user would hand it over."""

    key: str
    title: str
    model: nn.Module  # pixel space, eval mode, parameters as loaded
    input_shape: tuple[int, int, int]
    target_layer: str
    inputs: torch.Tensor  # (BATCH, C, H, W) in [0, 1]


@dataclass
class CaseResult:
    case: Case
    times: dict[str, list[float]] = field(default_factory=dict)
    ratios: dict[str, list[float]] = field(default_factory=dict)
    batch_of: dict[str, int] = field(default_factory=dict)
    report: OptimizeReport = field(default_factory=OptimizeReport)
    chunk_size: int = 0
    chunk_times: dict[int, float] = field(default_factory=dict)
    captum_search: dict[str, dict[int, float]] = field(default_factory=dict)
    captum_best: dict[str, int] = field(default_factory=dict)
    activation_bytes: dict[str, int] = field(default_factory=dict)
    setup_seconds: dict[str, float] = field(default_factory=dict)


# -- models ---------------------------------------------------------------------------------


def resnet_case() -> Case:
    model = resnet18_pixels()
    model.requires_grad_(True)  # as torch hands a model over: parameters require grad
    gen = torch.Generator().manual_seed(0)
    coarse = torch.rand((BATCH, 3, 7, 7), generator=gen)
    smooth = nn.functional.interpolate(coarse, size=(224, 224), mode="bilinear")
    inputs = (0.8 * smooth + 0.2 * torch.rand((BATCH, 3, 224, 224), generator=gen)).clamp(0, 1)
    return Case(
        "resnet18",
        "ResNet-18 layout (plain torch, random weights), 3x224x224",
        model,
        (3, 224, 224),
        RESNET_LAYER,
        inputs,
    )


def default_case() -> Case:
    """The default model if its trained cache exists (no training here), else its architecture."""
    from service.models import synthetic
    from service.models.net import DEFAULT_TARGET_LAYER, SaliencyNet
    from service.runtime.wrap import Normalized

    size = synthetic.IMAGE_SIZE
    title = f"default model (SaliencyNet, trained weights), 3x{size}x{size}"
    model: nn.Module | None = None
    try:
        from service.models import default

        directory = default.cache_dir()
        if (directory / default.META_FILE).is_file() and (
            directory / default.WEIGHTS_FILE
        ).is_file():
            model, meta = default.load_default_model()
            size = int(meta["input_size"][-1])
            title = f"default model (SaliencyNet, trained weights), 3x{size}x{size}"
    except Exception as error:  # a cache being written right now, or an older layout
        print(f"default model not loaded ({type(error).__name__}: {error})", flush=True)
        model = None
    if model is None:
        torch.manual_seed(0)
        model = Normalized(SaliencyNet(len(synthetic.CLASS_NAMES)), [0.5] * 3, [0.25] * 3)
        title = f"default model architecture (SaliencyNet, untrained: no cache), 3x{size}x{size}"
    model.eval().requires_grad_(True)
    batch = synthetic.generate(BATCH, seed=12345, size=size)
    inputs = torch.from_numpy(batch.images.astype(np.float32) / 255.0).permute(0, 3, 1, 2)
    return Case("default", title, model, (3, size, size), DEFAULT_TARGET_LAYER, inputs.contiguous())


def export_onnx(model: nn.Module, input_shape: tuple[int, int, int], directory: Path) -> Path:
    """``model.onnx`` exactly as an archive ships it (``export_artifacts``, parity checked)."""
    from service.runtime.export import export_artifacts

    quiet = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(quiet):
        warnings.simplefilter("ignore")
        return export_artifacts(model, input_shape, directory).onnx_path


# -- timing ---------------------------------------------------------------------------------


def timed(fn: Callable[[], object], min_seconds: float = MIN_BLOCK) -> float:
    """Seconds per call, over back-to-back calls lasting at least ``min_seconds``."""
    calls, start = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return elapsed / calls


def interleave(
    result: CaseResult,
    fns: dict[str, Callable[[], object]],
    repeats: int,
    warm: Sequence[str] | None = None,
) -> None:
    """Run ``fns`` in turn ``repeats`` times after one warm-up call each, recording times.

    Each timed call starts after a short pause: ONNX Runtime's pool threads spin for a
    while after a run, and would otherwise slow whatever torch measurement comes next.
    ``warm`` limits the warm-up to the named functions (the others ran already).
    """
    for name, fn in fns.items():
        if warm is None or name in warm:
            fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            time.sleep(PAUSE)
            result.times.setdefault(name, []).append(timed(fn))


def best_captum_rows(
    name: str, make: Callable[[int], Callable[[], object]], rows: Sequence[int], result: CaseResult
) -> int:
    """Captum's fastest batch setting on this run (each: one warm-up, then one timed call)."""
    seconds: dict[int, float] = {}
    for n_rows in rows:
        fn = make(n_rows)
        fn()
        time.sleep(PAUSE)
        seconds[n_rows] = timed(fn)
    result.captum_search[name] = seconds
    return min(seconds, key=lambda r: seconds[r])


# -- one model --------------------------------------------------------------------------------


def run_case(case: Case, repeats: int, slow_repeats: int) -> CaseResult:
    result = CaseResult(case)
    raw, shape, layer, x = case.model, case.input_shape, case.target_layer, case.inputs
    print(f"-- {case.title}", flush=True)

    start = time.perf_counter()
    optimized = optimize_for_inference(raw, shape, keep=[layer], report=result.report)
    result.setup_seconds["optimise"] = time.perf_counter() - start
    start = time.perf_counter()
    result.chunk_size, result.chunk_times = choose_chunk_size(
        optimized, shape, memory_budget=MEMORY_BUDGET, repeats=2
    )
    result.setup_seconds["choose chunk size"] = time.perf_counter() - start
    engine = Engine(optimized, target_layer=layer, input_shape=shape, chunk_size=result.chunk_size)
    # The same engine on the model as loaded (frozen only): what the optimiser buys.
    plain_engine = Engine(
        copy.deepcopy(raw), target_layer=layer, input_shape=shape, chunk_size=result.chunk_size
    )
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        onnx_path = export_onnx(raw, shape, Path(tmp))
        result.setup_seconds["export (pt2 + onnx + parity)"] = time.perf_counter() - start
        forward = OnnxForward(onnx_path, intra_op_threads=cpu_quota())

    result.activation_bytes = {
        "model as given": activation_bytes_per_image(raw, shape),
        "optimised": activation_bytes_per_image(optimized, shape),
    }
    with torch.no_grad():  # not inference_mode: Captum's autograd would refuse the targets
        targets = raw(x).argmax(dim=1)
    x1 = x[:1].clone()
    x_np, x1_np = x.numpy(), x1.numpy()

    def eager(model: nn.Module, inputs: torch.Tensor) -> Callable[[], object]:
        def run() -> object:
            with torch.inference_mode():
                return model(inputs)

        return run

    # The same engine with the torch methods under bfloat16 autocast (parity bounds:
    # tests/engine/test_precision.py); a speed-up only where the CPU has bf16 units.
    engine_bf16 = Engine(
        optimized,
        target_layer=layer,
        input_shape=shape,
        chunk_size=result.chunk_size,
        precision="bfloat16",
    )

    def ours(method: str, **params: object) -> Callable[[], object]:
        return lambda: engine.explain(x, targets, method, params)  # type: ignore[arg-type]

    def ours_bf16(method: str, **params: object) -> Callable[[], object]:
        return lambda: engine_bf16.explain(x, targets, method, params)  # type: ignore[arg-type]

    saliency = Saliency(raw)
    fast = {
        "forward_eager": eager(raw, x),
        "forward_opt": eager(optimized, x),
        "forward_onnx": lambda: forward(x_np),
        "forward_eager_1": eager(raw, x1),
        "forward_onnx_1": lambda: forward(x1_np),
        "vanilla_gradient": ours("vanilla_gradient"),
        "captum_saliency": lambda: saliency.attribute(x, target=targets, abs=True),
        "vanilla_gradient_plain": lambda: plain_engine.explain(x, targets, "vanilla_gradient"),
        "grad_cam": ours("grad_cam"),
        "vanilla_gradient_bf16": ours_bf16("vanilla_gradient"),
        "grad_cam_bf16": ours_bf16("grad_cam"),
    }
    result.batch_of = {name: (1 if name.endswith("_1") else BATCH) for name in fast}
    print("   forwards, vanilla gradient, Grad-CAM", flush=True)
    interleave(result, fast, repeats)

    # Captum's batch settings, within the same activation budget as our chunk sizes.
    per_image = result.activation_bytes["model as given"]
    rows = [r for r in CAPTUM_ROWS if r * per_image <= MEMORY_BUDGET] or [BATCH]
    noise_tunnel = NoiseTunnel(Saliency(raw))
    integrated = IntegratedGradients(raw)

    def captum_smoothgrad(n_rows: int) -> Callable[[], object]:
        per_batch = max(1, n_rows // BATCH)  # NoiseTunnel batches samples, BATCH rows each
        return lambda: noise_tunnel.attribute(
            x,
            nt_type="smoothgrad",
            nt_samples=SAMPLES,
            nt_samples_batch_size=per_batch,
            stdevs=NOISE,
            target=targets,
        )

    def captum_ig(n_rows: int, delta: bool = False) -> Callable[[], object]:
        return lambda: integrated.attribute(
            x,
            target=targets,
            n_steps=SAMPLES,
            internal_batch_size=n_rows,
            return_convergence_delta=delta,
        )

    print(f"   Captum batch settings (rows per pass: {rows})", flush=True)
    sg_rows = best_captum_rows("NoiseTunnel(Saliency) smoothgrad", captum_smoothgrad, rows, result)
    ig_rows = best_captum_rows("IntegratedGradients", captum_ig, rows, result)
    result.captum_best = {"smoothgrad": sg_rows, "integrated_gradients": ig_rows}
    slow = {
        "smoothgrad": ours("smoothgrad", n_samples=SAMPLES, noise_level=NOISE),
        "captum_smoothgrad": captum_smoothgrad(sg_rows),
        "integrated_gradients": ours("integrated_gradients", n_steps=SAMPLES),
        "captum_ig_delta": captum_ig(ig_rows, delta=True),
        "captum_ig": captum_ig(ig_rows),
    }
    result.batch_of.update(dict.fromkeys(slow, BATCH))
    print("   SmoothGrad, Integrated Gradients", flush=True)
    interleave(result, slow, slow_repeats, warm=("smoothgrad", "integrated_gradients"))
    # bfloat16 in a group of its own, beside its own Captum runs: in one group with the
    # float32 runs, float32 SmoothGrad timed 2-4x slower than alone (the cause was not
    # pinned down), and the float32 figures are the primary ones.
    slow_bf16 = {
        "smoothgrad_bf16": ours_bf16("smoothgrad", n_samples=SAMPLES, noise_level=NOISE),
        "captum_smoothgrad_b": captum_smoothgrad(sg_rows),
        "integrated_gradients_bf16": ours_bf16("integrated_gradients", n_steps=SAMPLES),
        "captum_ig_delta_b": captum_ig(ig_rows, delta=True),
    }
    result.batch_of.update(dict.fromkeys(slow_bf16, BATCH))
    print("   SmoothGrad, Integrated Gradients, bfloat16", flush=True)
    interleave(
        result, slow_bf16, slow_repeats, warm=("smoothgrad_bf16", "integrated_gradients_bf16")
    )

    for bar in BARS:
        result.ratios[bar.name] = per_repeat(result, bar.numerator, bar.denominator)
    for name, numerator, denominator in INFO_RATIOS:
        result.ratios[name] = per_repeat(result, numerator, denominator)
    return result


def per_repeat(result: CaseResult, numerator: str, denominator: str) -> list[float]:
    """The ratio within each repeat (both measured seconds apart)."""
    a, b = result.times[numerator], result.times[denominator]
    return [x / y for x, y in zip(a, b, strict=False)]


# -- report ---------------------------------------------------------------------------------


LABELS = {
    "forward_eager": "plain eager forward (model as given, inference_mode)",
    "forward_opt": "eager forward, optimised copy",
    "forward_onnx": "ONNX Runtime forward (archived model.onnx)",
    "forward_eager_1": "plain eager forward, batch 1",
    "forward_onnx_1": "ONNX Runtime forward, batch 1",
    "vanilla_gradient": "ours: vanilla_gradient",
    "captum_saliency": "Captum Saliency (abs=True)",
    "vanilla_gradient_plain": "vanilla_gradient, engine on the model as loaded (no optimiser)",
    "grad_cam": "ours: grad_cam",
    "smoothgrad": f"ours: smoothgrad, n_samples={SAMPLES}",
    "captum_smoothgrad": f"Captum NoiseTunnel(Saliency), smoothgrad, nt_samples={SAMPLES}",
    "integrated_gradients": f"ours: integrated_gradients, n_steps={SAMPLES} (+ completeness)",
    "captum_ig_delta": f"Captum IntegratedGradients, n_steps={SAMPLES}, with convergence delta",
    "captum_ig": f"Captum IntegratedGradients, n_steps={SAMPLES}, no delta",
    "vanilla_gradient_bf16": "ours: vanilla_gradient, bfloat16 autocast",
    "grad_cam_bf16": "ours: grad_cam, bfloat16 autocast",
    "smoothgrad_bf16": f"ours: smoothgrad, n_samples={SAMPLES}, bfloat16 autocast",
    "captum_smoothgrad_b": "Captum NoiseTunnel, as above, timed beside the bfloat16 runs",
    "captum_ig_delta_b": "Captum IntegratedGradients with delta, timed beside the bfloat16 runs",
    "integrated_gradients_bf16": f"ours: integrated_gradients, n_steps={SAMPLES}, bf16 autocast",
}


def fmt(values: Sequence[float], digits: int = 2) -> str:
    return " ".join(f"{v:.{digits}f}" for v in values)


def case_lines(result: CaseResult) -> tuple[list[str], bool]:
    case = result.case
    rep = result.report
    ok = True
    gain = rep.channels_last_gain
    lines = [
        f"## {case.title}",
        "",
        f"- batch {BATCH}; explained class = predicted; CAM layer `{case.target_layer}`",
        f"- optimiser: {len(rep.folded)} batch norms folded into their convolutions; "
        f"channels-last {'on' if rep.channels_last else 'off'} (measured gain on one "
        f"gradient pass: {'n/a' if gain is None else f'{gain:+.0%}'}); input convolution "
        + (
            f"`{rep.input_conv}` replaced by `stem.InputConv2d` (phase-split input gradient, "
            "normalisation folded)"
            if rep.input_conv
            else "kept"
        )
        + (
            f" (measured gain: {rep.input_conv_gain:+.0%})"
            if rep.input_conv_gain is not None
            else ""
        )
        + (f"; notes: {'; '.join(rep.notes)}" if rep.notes else ""),
        "- setup: " + ", ".join(f"{k} {v:.1f} s" for k, v in result.setup_seconds.items()),
        "",
        "| measurement | batch | median ms | images/s | per repeat (ms) |",
        "|---|---:|---:|---:|---|",
    ]
    for name, times in result.times.items():
        med = statistics.median(times)
        batch = result.batch_of[name]
        lines.append(
            f"| {LABELS.get(name, name)} | {batch} | {med * 1e3:.1f} | {batch / med:.1f} | "
            f"{fmt([t * 1e3 for t in times], 0)} |"
        )
    lines += [
        "",
        "| bar (ratio of times within a repeat) | median ratio | per repeat | bar | met |",
        "|---|---:|---|---|---|",
    ]
    for bar in BARS:
        values = result.ratios[bar.name]
        ratio = statistics.median(values)
        met = bar.met(ratio)
        ok &= met
        by = "" if met else f" (by {abs(ratio / bar.limit - 1):.0%})"
        lines.append(
            f"| {bar.name} | {ratio:.3f} | {fmt(values, 3)} | {bar.text()} | "
            f"{'yes' if met else 'NO' + by} |"
        )
    for name, *_ in INFO_RATIOS:
        values = result.ratios[name]
        lines.append(f"| {name} | {statistics.median(values):.3f} | {fmt(values, 3)} | | |")
    mib = {k: v / 2**20 for k, v in result.activation_bytes.items()}
    lines += [
        "",
        "Activation memory (bytes autograd keeps for one image's input gradient, parameters "
        "excluded): " + ", ".join(f"{k} {v:.1f} MiB" for k, v in mib.items()) + ".",
        "",
        f"| rows per pass (chunk size), CPU, activations <= {MEMORY_BUDGET >> 20} MiB "
        "| ms per row (fastest of 2) | chosen |",
        "|---:|---:|---|",
    ]
    for size, per_row in result.chunk_times.items():
        chosen = "yes" if size == result.chunk_size else ""
        lines.append(f"| {size} | {per_row * 1e3:.2f} | {chosen} |")
    settings = list(next(iter(result.captum_search.values())))
    lines += [
        "",
        "| Captum batch search (s, one call after a warm-up), rows per pass: | "
        + " | ".join(str(r) for r in settings)
        + " | best |",
        "|---|" + "---:|" * (len(settings) + 1),
    ]
    for name, search in result.captum_search.items():
        best = min(search, key=lambda r: search[r])
        cells = " | ".join(f"{search[r]:.2f}" for r in settings)
        lines.append(f"| {name} | {cells} | {best} |")
    lines.append("")
    return lines, ok


def write(
    results: list[CaseResult], out: Path, repeats: int, slow_repeats: int, load: tuple[float, float]
) -> bool:
    threads = cpu_quota()
    lines = [
        "# Speed: our engine and runtime against eager torch and Captum",
        "",
        f"Generated by `python -m bench.speed` on {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC.",
        "",
        f"- CPU: {cpu_model()} (bfloat16 units: {bf16_units()}); {os.cpu_count()} cores "
        f"visible, {threads} usable (cgroup quota "
        f"and affinity); torch threads {torch.get_num_threads()}, ONNX Runtime intra-op "
        f"threads {threads}; OpenMP wait policy "
        f"{os.environ.get('OMP_WAIT_POLICY', 'unset (libgomp default, active)')}; no GPU on "
        "this machine (the GPU path is not measured here)",
        f"- versions: Python {platform.python_version()}, torch {torch.__version__}, "
        f"onnxruntime {ort.__version__}, captum {captum.__version__}, numpy {np.__version__}",
        f"- every figure is measured in this run: median of {repeats} interleaved repeats "
        f"(SmoothGrad and IG: {slow_repeats}) after one warm-up; a repeat times a block of "
        f"back-to-back calls of at least {MIN_BLOCK * 1000:.0f} ms (one call for slower "
        "figures) and takes its mean; each ratio is taken within a "
        "repeat, the median over repeats reported; load average "
        f"{load[0]:.2f} before, {load[1]:.2f} after (a shared machine: spread shows in the "
        "per-repeat columns)",
        "- ours = the engine (`Engine.explain`, as served) on the optimised copy of the model "
        "(`service.runtime.optimize`: batch norm folded, the input convolution's gradient "
        "taken by phases, channels-last where measured faster, parameters frozen); Captum and "
        "the plain forward run on the model as given",
        "",
    ]
    ok = True
    for result in results:
        case_text, case_ok = case_lines(result)
        lines += case_text
        ok &= case_ok
    write_report(out, lines)
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--repeats", type=int, default=11, help="repeats of the fast measurements")
    parser.add_argument(
        "--slow-repeats", type=int, default=3, help="repeats of SmoothGrad and IG (seconds each)"
    )
    parser.add_argument("--models", default="resnet18,default", help="comma-separated")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--strict", action="store_true", help="exit 1 when a bar is missed")
    add_omp_policy_argument(parser)
    args = parser.parse_args(argv)
    if (code := rerun_with_omp_policy(MODULE, args.omp_wait_policy, argv)) is not None:
        return code
    torch.set_num_threads(cpu_quota())
    # Captum warns on every call that it set requires_grad on the inputs (and undoes it).
    warnings.filterwarnings("ignore", message="Input Tensor 0 did not already require")
    makers = {"resnet18": resnet_case, "default": default_case}
    load_before = os.getloadavg()[0]
    results = [
        run_case(makers[key](), args.repeats, args.slow_repeats) for key in args.models.split(",")
    ]
    ok = write(
        results, args.out, args.repeats, args.slow_repeats, (load_before, os.getloadavg()[0])
    )
    return 0 if ok or not args.strict else 1


if __name__ == "__main__":
    # Exit only on failure: bench.run runs suites in one process via runpy, and a
    # SystemExit(0) would end the run before the suites after this one.
    if code := main():
        sys.exit(code)
