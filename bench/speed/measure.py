"""Every measurement on one model, in one process, interleaved."""

from __future__ import annotations

import copy
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from captum.attr import IntegratedGradients, NoiseTunnel, Saliency
from torch import nn

from bench.speed import BATCH, CAPTUM_ROWS, MEMORY_BUDGET, NOISE, SAMPLES
from bench.speed.bars import BARS, INFO_RATIOS
from bench.speed.cases import Case, CaseResult, export_onnx
from bench.speed.timing import best_captum_rows, interleave
from service.engine.engine import Engine
from service.runtime.onnx_forward import OnnxForward, cpu_quota
from service.runtime.optimize import (
    activation_bytes_per_image,
    choose_chunk_size,
    optimize_for_inference,
)


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
