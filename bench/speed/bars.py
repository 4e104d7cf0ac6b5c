"""The bars each ratio is held to, the ratios only reported, and the rows' labels."""

from __future__ import annotations

from dataclasses import dataclass

from bench.speed import SAMPLES


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
