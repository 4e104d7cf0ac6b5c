"""One prepared GPU run (issue 13, item 5): the zoo's full-size models on one CUDA device.

Run through ``bench/gpu_check.sh`` (it checks for CUDA and bounds the run to 8 minutes).
Per zoo model at 224 px, random weights (nothing is downloaded), batch 8, in one process:

* forwards: eager torch, torch with a CUDA graph of the fixed-shape forward, ONNX Runtime
  on the CUDA execution provider with IO binding;
* gradient methods (vanilla gradient, SmoothGrad, Integrated Gradients, Grad-CAM) in
  float32 and under bfloat16 / float16 autocast, and what the precision guard would keep;
* forward-only methods (occlusion, RISE, Sobol, new defaults) on the ORT forward;

each as images/s and as the ratio of its time to one eager forward of the same batch.
Writes ``bench/results/gpu.md``. ``--dry-run`` runs the same code on the CPU with the
tiny zoo models at 64 px and one repeat: the rehearsal the tests run where no GPU is.
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from bench.machine import write_report
from service.engine.engine import Engine
from service.engine.layer_finder import find_cam_layer
from service.engine.modules import freeze
from service.engine.types import NumpyForward
from service.models.zoo import IMAGENET_MEAN, IMAGENET_STD, ZOO
from service.runtime.export import export_onnx
from service.runtime.optimize.precision import choose_precision
from service.runtime.wrap import Normalized

RESULTS = Path(__file__).resolve().parent / "results" / "gpu.md"
REHEARSAL = RESULTS.with_name("gpu_dry_run.md")  # never mistaken for GPU figures
FULL_MODELS = ("resnet50", "efficientnet_b0", "convnext_tiny", "vit_s16")
GRADIENT_METHODS = ("vanilla_gradient", "smoothgrad", "integrated_gradients", "grad_cam")
FORWARD_ONLY = ("occlusion", "rise", "sobol")
PRECISIONS = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class Setting:
    """What one run measures: full-size models on CUDA, or the CPU rehearsal."""

    device: torch.device
    size: str  # the zoo's "full" or "tiny"
    side: int
    batch: int
    repeats: int
    budget_s: float

    @classmethod
    def choose(cls, dry_run: bool, budget_s: float) -> Setting:
        if dry_run or not torch.cuda.is_available():
            return cls(torch.device("cpu"), "tiny", 64, 2, 1, budget_s)
        return cls(torch.device("cuda"), "full", 224, 8, 5, budget_s)


def providers_for(device: torch.device) -> list[str]:
    """ORT providers: CUDA first where both the device and this onnxruntime build have it."""
    if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def io_bound_forward(session: ort.InferenceSession, device: torch.device) -> NumpyForward:
    """A forward through IO binding: the output stays a device buffer bound once per call,
    and only the logits come back to the host (the perturbation methods read nothing else).
    On the CPU the same calls bind host memory, so the rehearsal runs this very path."""
    input_name = session.get_inputs()[0].name
    output_name = session.get_outputs()[0].name
    on_cuda = device.type == "cuda" and "CUDAExecutionProvider" in session.get_providers()
    target = "cuda" if on_cuda else "cpu"

    def forward(pixels: np.ndarray) -> np.ndarray:
        binding = session.io_binding()
        binding.bind_cpu_input(input_name, np.ascontiguousarray(pixels, dtype=np.float32))
        binding.bind_output(output_name, target)
        session.run_with_iobinding(binding)
        return np.asarray(binding.copy_outputs_to_cpu()[0], dtype=np.float32)

    return forward


def synced(device: torch.device) -> Callable[[], None]:
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


def seconds(fn: Callable[[], object], setting: Setting) -> float:
    """Median of ``repeats`` timed runs after one warm-up, the device synchronised."""
    sync = synced(setting.device)
    fn()
    sync()
    times = []
    for _ in range(setting.repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def graphed_forward(model: torch.nn.Module, example: torch.Tensor) -> Callable[[], object] | None:
    """The fixed-shape forward replayed from a CUDA graph; ``None`` off CUDA."""
    if example.device.type != "cuda":
        return None
    static = example.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        for _ in range(3):  # warm-up on a side stream, as torch.cuda.graphs asks
            model(static)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        model(static)
    return graph.replay


def model_rows(name: str, setting: Setting, tmp: Path) -> list[str]:
    """Table rows of one zoo model: ``| model | what | images/s | time / eager forward |``."""
    side, batch = setting.side, setting.batch
    net = ZOO[name](setting.size, 1000, side, 0)  # type: ignore[arg-type]
    model = freeze(Normalized(net, IMAGENET_MEAN, IMAGENET_STD)).to(setting.device)
    pixels = torch.rand(batch, 3, side, side, generator=torch.Generator().manual_seed(0))
    example = pixels.to(setting.device)
    targets = list(range(batch))

    def eager() -> object:
        with torch.no_grad():
            return model(example)

    t_forward = seconds(eager, setting)
    measured: list[tuple[str, float]] = [("eager forward", t_forward)]
    graph = graphed_forward(model, example)
    if graph is not None:
        measured.append(("CUDA-graph forward", seconds(graph, setting)))
    path = export_onnx(model.cpu(), (3, side, side), tmp / f"{name}.onnx")
    model.to(setting.device)
    session = ort.InferenceSession(str(path), providers=providers_for(setting.device))
    forward = io_bound_forward(session, setting.device)
    host = pixels.numpy()
    ep = session.get_providers()[0].replace("ExecutionProvider", "")
    measured.append((f"ORT forward ({ep} EP, IO binding)", seconds(lambda: forward(host), setting)))

    layer = find_cam_layer(model, (3, side, side)).name
    failures: dict[str, str] = {}

    def attempt(what: str, run: Callable[[], object], scale: float = 1.0) -> None:
        # One run on a lent machine: a method that fails on one model is a row, not the end.
        try:
            measured.append((what, seconds(run, setting) * scale))
        except Exception as error:
            failures[what] = f"{type(error).__name__}: {str(error)[:120]}"

    for precision in PRECISIONS:
        engine = Engine(model, target_layer=layer, input_shape=(3, side, side), precision=precision)
        for method in GRADIENT_METHODS:
            run = lambda m=method, e=engine: e.explain(example, targets, m)  # noqa: E731
            attempt(f"{method}, {precision}", run)
        if precision != "float32":
            guard = choose_precision(model, (batch, 3, side, side), precision)
            measured.append((f"precision guard keeps: {guard.chosen}", float("nan")))

    engine = Engine(model, input_shape=(3, side, side), forward_numpy=forward, chunk_size=32)
    one = example[:1]
    for method in FORWARD_ONLY:
        run = lambda m=method, e=engine: e.explain(one, [0], m)  # noqa: E731
        # One image per call, the methods' unit, counted as `batch` calls so that the
        # ratio reads against the eager forward of a batch.
        attempt(f"{method} (1 image, ORT)", run, scale=batch)

    rows = []
    for what, t in measured:
        if np.isnan(t):
            rows.append(f"| {name} | {what} | | |")
        else:
            rows.append(f"| {name} | {what} | {batch / t:.1f} | {t / t_forward:.2f} |")
    rows.extend(f"| {name} | {what}: failed ({why}) | | |" for what, why in failures.items())
    return rows


def run(setting: Setting, models: list[str], out: Path) -> list[str]:
    start = time.perf_counter()
    device_name = (
        torch.cuda.get_device_name(setting.device) if setting.device.type == "cuda" else "CPU"
    )
    rehearsal = setting.device.type != "cuda"
    lines = [
        "# GPU check: the zoo on one device"
        + (" -- CPU rehearsal (--dry-run), no GPU figures" if rehearsal else ""),
        "",
        f"Generated by `bench/gpu_check.sh{' --dry-run' if rehearsal else ''}` "
        f"on {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC: {device_name}; torch "
        f"{torch.__version__}, onnxruntime {ort.__version__} (providers "
        f"{', '.join(ort.get_available_providers())}); {setting.size} models at "
        f"{setting.side} px, batch {setting.batch}, median of {setting.repeats} after a "
        "warm-up. Forward-only methods: one image per call, their time counted per batch "
        "of images so that every ratio reads against the same eager forward of the batch."
        + (
            " A rehearsal checks that the script runs end to end; its figures are one run "
            "on a shared CPU and say nothing about speed."
            if rehearsal
            else ""
        ),
        "",
        "| model | what | images/s | time / eager forward |",
        "|---|---|---:|---:|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for name in models:
            if time.perf_counter() - start > setting.budget_s:
                lines.append(
                    f"| {name} | not measured: the {setting.budget_s:.0f} s budget ran out | | |"
                )
                continue
            lines.extend(model_rows(name, setting, Path(tmp)))
            print(f"gpu_check: {name} done at {time.perf_counter() - start:.0f} s", flush=True)
    lines += ["", f"The run took {time.perf_counter() - start:.0f} s.", ""]
    write_report(out, lines)
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--dry-run", action="store_true", help="tiny models on the CPU")
    parser.add_argument("--models", default=",".join(FULL_MODELS))
    parser.add_argument("--budget-s", type=float, default=420.0)
    parser.add_argument("--out", type=Path, default=None, help=f"default {RESULTS.name}")
    args = parser.parse_args(argv)
    out = args.out or (REHEARSAL if args.dry_run else RESULTS)
    setting = Setting.choose(args.dry_run, args.budget_s)
    if not args.dry_run and setting.device.type != "cuda":
        print("gpu_check: no CUDA device visible to torch; nothing measured", file=sys.stderr)
        return 2
    run(setting, args.models.split(","), out)
    return 0


if __name__ == "__main__":
    if code := main():
        sys.exit(code)
