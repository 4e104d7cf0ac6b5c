"""Gradients, Grad-CAM and the forwards on one zoo model, beside Captum and eager torch."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from captum.attr import IntegratedGradients, NoiseTunnel, Saliency
from torch import nn

from bench.speed import BATCH, NOISE
from bench.speed.cases import Case, CaseResult, random_images
from bench.speed.measure import per_repeat
from bench.speed.report import fmt
from bench.speed.timing import interleave
from bench.zoo import SIDE, served_full
from bench.zoo_speed import RATIOS
from service.models.zoo import IMAGENET_MEAN, IMAGENET_STD, ZOO
from service.runtime.artifacts import ModelBundle
from service.runtime.wrap import Normalized


def as_given(name: str) -> nn.Module:
    """The zoo model as a user hands it over: pixel space, eval mode, parameters trainable."""
    net = ZOO[name]("full", 1000, SIDE, 0)
    return Normalized(net, IMAGENET_MEAN, IMAGENET_STD).eval().requires_grad_(True)


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
