"""Speed of the forward-only methods against their floor and against Captum.

Run ``python -m bench.perturbation`` (``make bench`` runs it too). In one process, on one
model, with every measurement interleaved repeat by repeat (so a noisy neighbour slows
all of them alike):

* RISE and Sobol against their floor: the number of forwards times the time of one
  batched ONNX Runtime forward of ``chunk_size`` images. The bar is a ratio <= 1.15: what
  the method adds around the forwards (masks, perturbing, folding) costs < 15 %.
* Our occlusion (ONNX Runtime) against ``captum.attr.Occlusion`` on the eager torch model
  with the same window, stride and baseline, batched the same way (``perturbations_per_eval
  = chunk_size``) and with Captum's default (one perturbation per forward). The bar is
  >= 1.5x faster than the batched Captum run, the stronger of the two.

Writes ``bench/results/perturbation.md`` and exits 1 when a bar is missed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import captum
import numpy as np
import onnxruntime as ort
import torch
from captum.attr import Occlusion

from bench.machine import cpu_model, write_report
from service.engine.registry import get_method
from service.engine.types import ExplainContext
from service.runtime.export import export_onnx
from service.runtime.onnx_forward import OnnxForward, cpu_quota

RESULTS = Path(__file__).resolve().parent / "results" / "perturbation.md"
FLOOR_BAR = 1.15
FIXED_COUNT = {"rise": {"tolerance": 0.0}, "sobol": {"tolerance": 0.0}, "occlusion": {"coarse": 1}}
CAPTUM_BAR = 1.5


def load_model() -> tuple[torch.nn.Module, int, str]:
    """``(pixel-space module, input size, description)``: the default model if it loads.

    Timings depend on the architecture only, so an untrained copy of the default
    architecture is an equal stand-in when the trained weights are not there.
    """
    try:
        from service.models.default import load_default_model  # type: ignore[import-not-found]

        module, meta = load_default_model()
        input_size = meta["input_size"]  # an int, or (C, H, W) / (H, W)
        size = int(input_size[-1] if isinstance(input_size, list | tuple) else input_size)
        return module.eval(), size, "default model (trained weights)"
    except Exception as error:  # not built yet, or no cached weights: same architecture
        from service.models import synthetic
        from service.models.net import SaliencyNet
        from service.runtime.wrap import Normalized

        torch.manual_seed(0)
        net = SaliencyNet(num_classes=len(synthetic.CLASS_NAMES))
        module = Normalized(net, [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]).eval()
        reason = type(error).__name__
        return module, synthetic.IMAGE_SIZE, f"SaliencyNet, untrained ({reason} loading default)"


def bench_image(size: int) -> torch.Tensor:
    try:
        from service.models import synthetic

        batch = synthetic.generate(1, seed=0, size=size)
        return torch.from_numpy(batch.images.astype(np.float32) / 255.0).permute(0, 3, 1, 2)
    except Exception:
        return torch.rand((1, 3, size, size), generator=torch.Generator().manual_seed(0))


@dataclass
class Row:
    name: str
    forwards: int
    times: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def spread(values: list[float]) -> str:
    return " ".join(f"{v:.2f}" for v in values)


def run(repeats: int = 5, chunk_size: int = 32, out: Path = RESULTS) -> bool:
    """Measure, write the table to ``out`` and return whether every bar is met."""
    threads = cpu_quota()
    torch.set_num_threads(threads)
    model, size, model_name = load_model()
    with tempfile.TemporaryDirectory() as tmp:
        # The graph a served model runs: the archive's exporter, not a bench-only one.
        path = export_onnx(model, (3, size, size), Path(tmp) / "model.onnx")
        forward = OnnxForward(path, intra_op_threads=threads, max_batch=chunk_size)

    image = bench_image(size)
    target = torch.tensor([int(forward(image.numpy()).argmax())])
    rng = np.random.default_rng(0)
    chunk = (image.numpy() * rng.random((chunk_size, 1, size, size))).astype(np.float32)

    def forward_n_times(n: int) -> None:
        for _ in range(n):
            forward(chunk)

    def method(name: str) -> Callable[[], object]:
        spec = get_method(name)
        # A fixed count of forwards (no early stop, every occlusion window): what the floor
        # and Captum's exhaustive occlusion are measured against. The cheaper defaults are
        # bench.fewer_forwards' subject.
        params = spec.resolve_params(FIXED_COUNT[name])

        def call() -> object:
            ctx = ExplainContext(
                model=None,
                forward_numpy=forward,
                generator=torch.Generator().manual_seed(0),
                chunk_size=chunk_size,
            )
            return spec.fn(ctx, image, target, **params)

        return call

    occ = get_method("occlusion").resolve_params(None)
    window, stride, baseline = int(occ["window"]), int(occ["stride"]), float(occ["baseline"])
    windows = (math.ceil((size - window) / stride) + 1) ** 2

    def captum_occlusion(per_eval: int) -> Callable[[], object]:
        occlusion = Occlusion(model)

        def call() -> object:
            with torch.no_grad():
                return occlusion.attribute(
                    image,
                    sliding_window_shapes=(3, window, window),
                    strides=(3, stride, stride),
                    baselines=baseline,
                    target=target,
                    perturbations_per_eval=per_eval,
                )

        return call

    rise, sobol = get_method("rise").defaults, get_method("sobol").defaults
    sobol_grid = int(sobol["grid_size"])
    rows = {
        "forward": (
            Row(f"one ONNX forward of {chunk_size}", chunk_size, []),
            lambda: forward(chunk),
        ),
        "rise": (Row("RISE", int(rise["n_masks"]), []), method("rise")),
        "sobol": (
            Row("Sobol", int(sobol["n_designs"]) * (sobol_grid**2 + 2), []),
            method("sobol"),
        ),
        "occlusion": (Row("occlusion (ours, ONNX Runtime)", windows + 1, []), method("occlusion")),
        "captum": (
            Row(f"Captum Occlusion, torch, {chunk_size} per eval", windows + 1, []),
            captum_occlusion(chunk_size),
        ),
        "captum1": (
            Row("Captum Occlusion, torch, 1 per eval (default; timed once)", windows + 1, []),
            captum_occlusion(1),
        ),
    }
    load_before = os.getloadavg()
    for key, (_, fn) in rows.items():  # warm-up: sessions, allocators, caches
        if key != "captum1":  # shares its code path with "captum", warmed just before
            fn()
    # Each method runs right after its floor, timed as what the floor means: its number of
    # chunk forwards run back to back. Same length, adjacent in time, so drifting load on a
    # shared machine hits both alike; the median of the per-repeat ratios is reported.
    ratios: dict[str, list[float]] = {"rise": [], "sobol": [], "occlusion": []}
    for repeat in range(repeats):
        for key, (row, fn) in rows.items():
            if key == "forward" or (key == "captum1" and repeat > 0):
                continue  # Captum's one-per-eval default is slow and only for reference
            if key in ratios:
                n_chunks = math.ceil(row.forwards / chunk_size)
                t_floor = timed(functools.partial(forward_n_times, n_chunks))
                rows["forward"][0].times.append(t_floor / n_chunks)
            row.times.append(timed(fn))
            if key in ratios:
                ratios[key].append(row.times[-1] / t_floor)
        time.sleep(0.5)  # let torch's worker threads go idle before the next floor
    load_after = os.getloadavg()

    t_forward = rows["forward"][0].median

    def floor(row: Row) -> float:
        return math.ceil(row.forwards / chunk_size) * t_forward

    lines = [
        "# Forward-only methods: time against the floor and against Captum",
        "",
        f"Generated by `python -m bench.perturbation` on {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M}"
        " UTC.",
        "",
        f"- model: {model_name}, input 3x{size}x{size}, one image, explained class = predicted",
        f"- CPU: {cpu_model()}; {os.cpu_count()} cores visible, {threads} usable (cgroup quota "
        f"and affinity); ONNX Runtime intra-op threads {threads}, torch threads "
        f"{torch.get_num_threads()}",
        f"- providers: {', '.join(forward.providers)}",
        f"- versions: Python {platform.python_version()}, torch {torch.__version__}, "
        f"onnxruntime {ort.__version__}, numpy {np.__version__}, captum {captum.__version__}",
        f"- chunk size {chunk_size}; median of {repeats} interleaved repeats after one warm-up; "
        f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after (shared machine)",
        f"- floor = ceil(forwards / {chunk_size}) x time of one batched forward of "
        f"{chunk_size} images (median {t_forward * 1e3:.1f} ms), timed as that many forwards "
        "back to back right before the method; time / floor is the median over repeats of "
        "each repeat's ratio",
        "",
        "| method | params | forwards | median time (s) | floor (s) | time / floor "
        "| per repeat | bar | met |",
        "|---|---|---:|---:|---:|---:|---|---|---|",
    ]
    ok = True
    specs = {
        "rise": f"n_masks={rise['n_masks']}, grid_size={rise['grid_size']}",
        "sobol": f"grid_size={sobol_grid}, n_designs={sobol['n_designs']}",
        "occlusion": f"window={window}, stride={stride}",
    }
    for key in ("rise", "sobol"):
        row = rows[key][0]
        ratio = statistics.median(ratios[key])
        met = ratio <= FLOOR_BAR
        ok &= met
        lines.append(
            f"| {row.name} | {specs[key]} | {row.forwards} | {row.median:.3f} | "
            f"{floor(row):.3f} | {ratio:.3f} | {spread(ratios[key])} | <= {FLOOR_BAR} | "
            f"{'yes' if met else 'NO'} |"
        )
    ours = rows["occlusion"][0]
    lines.append(
        f"| {ours.name} | {specs['occlusion']} | {ours.forwards} | {ours.median:.3f} | "
        f"{floor(ours):.3f} | {statistics.median(ratios['occlusion']):.3f} | "
        f"{spread(ratios['occlusion'])} | | |"
    )
    lines += [
        "",
        "| occlusion, same window/stride/baseline | median time (s) | ours is faster by "
        "| bar | met |",
        "|---|---:|---:|---|---|",
        f"| {ours.name} | {ours.median:.3f} | | | |",
    ]
    for key in ("captum", "captum1"):
        row = rows[key][0]
        speedup = row.median / ours.median
        bar = key == "captum"
        met = speedup >= CAPTUM_BAR
        if bar:
            ok &= met
        lines.append(
            f"| {row.name} | {row.median:.3f} | {speedup:.2f}x | "
            f"{f'>= {CAPTUM_BAR}x' if bar else ''} | {('yes' if met else 'NO') if bar else ''} |"
        )
    lines.append("")
    write_report(out, lines)
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--chunk-size", type=int, default=32)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    return 0 if run(args.repeats, args.chunk_size, args.out) else 1


if __name__ == "__main__":
    # Exit only on failure: bench.run executes suites in one process via runpy, and a
    # SystemExit(0) would end the run before the suites after this one.
    if code := main():
        sys.exit(code)
