"""The forward-only methods on one zoo model: forwards, seconds, and the ORT settings' gain."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np

from bench.speed.cases import random_images
from bench.speed.report import fmt
from bench.speed.timing import timed
from bench.zoo import CACHE, SIDE, forwards, served_full
from bench.zoo_speed.gradients import ort_reason
from service.engine.registry import METHODS
from service.runtime.artifacts import ONNX_FILE, ModelBundle
from service.runtime.onnx_forward import OnnxForward, cpu_quota
from service.runtime.ort_choice import OrtSettings


@dataclass
class PerturbRow:
    method: str
    params: str
    registry_forwards: int
    rows_run: int
    seconds: float
    chunk_seconds: float
    chunk: int


class CountingForward:
    """The bundle's ONNX forward, counting the rows it is sent (the forwards really run)."""

    def __init__(self, forward: Callable[[np.ndarray], np.ndarray]) -> None:
        self.forward = forward
        self.rows = 0

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        self.rows += int(pixels.shape[0])
        return self.forward(pixels)


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
    runs: dict[str, tuple[Callable[[np.ndarray], np.ndarray], OrtSettings]] = {
        "default": (before, default),
        "chosen": (bundle.forward, chosen),
        "io binding": (lambda _: bound(), chosen),
    }
    for forward, settings in runs.values():
        forward(inputs[settings])  # warm
    for _ in range(repeats):
        for key, (forward, settings) in runs.items():
            batch = inputs[settings]
            per_row[key].append(timed(partial(forward, batch)) / settings.chunk)
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
