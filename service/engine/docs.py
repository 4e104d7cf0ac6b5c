"""The methods table of ``docs/methods.md``, rendered from the registry.

``python -m service.engine.docs`` prints the page; ``--write`` updates the file. A test
fails when the committed page differs from the registry.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from service.engine.registry import MethodSpec, list_methods

DOC_PATH = Path(__file__).resolve().parents[2] / "docs" / "methods.md"

HEADER = """# Explanation methods

Generated from the method registry (`service/engine/registry.py`) by
`python -m service.engine.docs --write`; do not edit by hand.

Every method takes a batch of float32 images `(B, C, H, W)` in `[0, 1]` and one target class
per image (default: the predicted class, never class 0), and returns float32 maps `(B, H, W)`
at input resolution. `torch` methods need a differentiable model and only ever take
gradients with respect to the input (or, for CAM, the target layer's activations); `onnx`
methods run forward passes only.
"""

CONVENTIONS = """
## Conventions

- **Channel reduction.** `vanilla_gradient` and the SmoothGrad family take the maximum
  over colour channels of a non-negative per-channel statistic (`|g|`, `|mean g|`,
  `mean g^2`, `var g`). `gradient_x_input` and `integrated_gradients` *sum* over channels
  and keep the sign, so a map sums to the total attribution.
- **SmoothGrad noise.** `noise_level` is a fraction of the image's own pixel range:
  `sigma = noise_level * (max(x) - min(x))` over all pixels and channels (Smilkov et al.
  2017). The standard normal draws are one `(n_samples, C, H, W)` tensor from the request's
  seeded generator, shared by the items of a batch, so a map depends on its image, target,
  parameters and seed, and not on what the server batched it with. VarGrad is the
  population variance.
- **Integrated Gradients.** `integration` is `gauss_legendre`, `riemann_trapezoid`
  (composite trapezoid, exact for linear models; Captum's variant is ours times
  `(n-1)/n`), `riemann_middle`, `riemann_left` or `riemann_right`. `baseline` is `black`,
  `blurred` (Gaussian, `blur_sigma` pixels) or `uniform` (one `U[0,1)` image per request).
  `completeness_error = |sum(attr) - (f(x)_t - f(x')_t)|` comes from the same batched
  passes as the path (the end points ride along with weight 0).
- **CAM.** Grad-CAM and Grad-CAM++ use the model's target layer, are ReLU'd at the layer's
  resolution and upsampled bilinearly (`align_corners=False`).
"""


def _params(spec: MethodSpec) -> str:
    if not spec.defaults:
        return "-"
    return "<br>".join(f"`{k}={v!r}`" for k, v in spec.defaults.items())


def _needs(spec: MethodSpec) -> str:
    needs = ["gradients" if spec.needs_gradients else "forward only"]
    if spec.needs_layer:
        needs.append("target layer")
    return ", ".join(needs)


def render() -> str:
    """The whole page as Markdown."""
    rows = [
        "| method | backend | needs | defaults | description |",
        "|---|---|---|---|---|",
    ]
    for spec in list_methods():
        description = spec.description.replace("|", "\\|")
        rows.append(
            f"| `{spec.name}` | {spec.backend} | {_needs(spec)} | {_params(spec)} "
            f"| {description} [paper]({spec.paper}) |"
        )
    return HEADER + "\n" + "\n".join(rows) + "\n" + CONVENTIONS


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--write", action="store_true", help=f"write {DOC_PATH}")
    args = parser.parse_args(argv)
    text = render()
    if args.write:
        DOC_PATH.parent.mkdir(parents=True, exist_ok=True)
        DOC_PATH.write_text(text, encoding="utf-8")
    else:
        print(text, end="")


if __name__ == "__main__":
    main()
