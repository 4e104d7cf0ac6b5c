"""KernelSHAP (Lundberg & Lee 2017): Shapley values of superpixels by weighted least squares.

As Captum's ``KernelShap`` does: rows 0 and 1 keep all / none of the superpixels, then
each row draws its size ``k`` in ``1..M-1`` with probability proportional to
``(M - 1) / (k (M - k))`` and a uniform subset of that size (:func:`kernel_shap_samples`):
the Shapley kernel as a sampling distribution, so those rows weigh 1. The all-on and
all-off rows weigh ``1e6``, Captum's stand-in for the infinite weight that forces
``b = f(baseline)`` and ``b + sum c = f(x)``. Unregularised least squares, the minimum-norm
solution when the rows do not determine every coefficient. Superpixels, baselines, draws
and the fit are LIME's (see the LIME section).
"""

from __future__ import annotations

import numpy as np
import torch

from service.engine.methods.superpixels import SHARED, cost, surrogate_maps, validate
from service.engine.registry import register_method
from service.engine.types import Attribution, ExplainContext

LUNDBERG_2017 = "https://arxiv.org/abs/1705.07874"
ENDPOINT_WEIGHT = 1e6  # Captum's KernelShap.inf_weight


def kernel_shap_samples(n_samples: int, n_features: int, generator: torch.Generator) -> np.ndarray:
    """bool ``(n_samples, n_features)``: all on, all off, then Shapley-kernel subset sizes."""
    on = torch.zeros((n_samples, n_features), dtype=torch.bool)
    on[0] = True
    rest = n_samples - 2
    if rest > 0 and n_features > 1:
        size = torch.arange(1, n_features, dtype=torch.float64)
        probs = (n_features - 1) / (size * (n_features - size))
        k = torch.multinomial(probs, rest, replacement=True, generator=generator) + 1
        # A uniform subset of size k: the k features with the smallest uniform keys.
        rank = torch.rand((rest, n_features), generator=generator).argsort(1).argsort(1)
        on[2:] = rank < k[:, None]
    elif rest > 0:  # one feature: all on and all off are the only rows there are
        on[2::2] = True
    return on.numpy()


def kernel_shap_weights(on: np.ndarray) -> np.ndarray:
    """1 for sampled rows, ``1e6`` for the all-on and all-off rows."""
    size = on.sum(axis=1)
    return np.where((size == 0) | (size == on.shape[1]), ENDPOINT_WEIGHT, 1.0)


@register_method(
    "kernel_shap",
    backend="onnx",
    needs_gradients=False,
    params=SHARED,
    validate=validate,
    cost=cost,
    description="Shapley values of superpixels from a least-squares fit under the Shapley "
    "kernel (Lundberg & Lee 2017, KernelSHAP)",
    paper=LUNDBERG_2017,
)
def kernel_shap(
    ctx: ExplainContext,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    n_samples: int,
    n_segments: int,
    compactness: float,
    baseline: str,
) -> Attribution:
    """KernelSHAP over SLIC superpixels (the module docstring states every convention).

    Args:
        ctx: request context; ``forward_numpy``, ``generator``, ``chunk_size``, deadline.
        inputs: ``(B, C, H, W)`` pixels in ``[0, 1]``.
        targets: ``(B,)`` class to explain per image.
        n_samples, n_segments, compactness, baseline: see ``SHARED``.

    Returns:
        ``Attribution`` with float32 ``(B, H, W)`` maps: each pixel its superpixel's
        Shapley value estimate, in logit units; they sum (over superpixels) to
        ``f(x) - f(baseline)`` up to the endpoint weight's slack. Costs ``B * n_samples``
        forwards.

    Raises:
        DeadlineExceededError: the deadline passed between chunks; no map is returned.

    Paper: https://arxiv.org/abs/1705.07874
    """
    return surrogate_maps(
        ctx,
        inputs,
        targets,
        "kernel_shap",
        (n_segments, compactness, baseline),
        n_samples,
        kernel_shap_samples,
        kernel_shap_weights,
        0.0,
    )
