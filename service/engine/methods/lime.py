"""LIME (Ribeiro et al. 2016): a ridge surrogate of the target logit over superpixels.

As ``lime_image`` does: row 0 keeps every superpixel, the others keep each with
probability 1/2 (:func:`lime_samples`). A row's weight is ``exp(-d^2 / (2 w^2))`` with ``d``
the cosine distance between ``z`` and all-ones (1 for the all-off row) and ``w`` the
``kernel_width``; the fit is ridge regression (``ridge``; the intercept is not penalised),
as lime's ``Ridge(alpha=1)``.

Shared with KernelSHAP (``superpixels.py``):

* **Superpixels**: scikit-image's SLIC (``start_label=0``, its defaults otherwise) on the
  model-resolution image; RGB is converted to Lab as SLIC does by default, other channel
  counts are scaled to ``[0, 100]`` (Lab's lightness range) so that ``compactness`` means
  the same. They follow the input: uniform noise of 0.05 moves SLIC's boundaries a lot
  on the default model's images (adapted Rand error 0.35 to 0.5), which is most of the
  two methods' instability in ``bench/results/quality.md``. scikit-image rather than
  OpenCV's ``ximgproc``: that lives in the contrib build, which would replace the
  headless OpenCV the service pins.
* **Switched-off superpixels** take the ``baseline``: ``blur`` (10x10 box blur, as RISE
  and Sobol; the default), ``mean`` (the superpixel's mean colour, lime's default) or
  ``zero``.
* **Draws**: ``s = seed_from(request generator)``; image ``b``'s draws come from
  ``torch.Generator().manual_seed(s)`` for every ``b``, so a map never depends on the
  batch it was computed in.
* **Fit**: ``logit ~ b + sum_j c_j z_j`` (``z_j = 1``: superpixel ``j`` kept), weighted, in
  float64 and closed form, on the target **logit** (as occlusion and MuFidelity:
  attributions add up in the logit, and softmax saturates); each pixel gets its
  superpixel's ``c_j``, signed (positive supports the target). Costs ``n_samples``
  forwards per image.
"""

from __future__ import annotations

import numpy as np
import torch

from service.engine.methods.superpixels import SHARED, cost, surrogate_maps, validate
from service.engine.registry import Param, register_method
from service.engine.types import Attribution, ExplainContext

RIBEIRO_2016 = "https://arxiv.org/abs/1602.04938"
PARAMS = (
    *SHARED,
    Param(
        "kernel_width",
        "float",
        0.25,
        "width of the exponential kernel on the cosine distance to the image (lime's 0.25)",
        minimum=0.0,
        maximum=100.0,
        minimum_exclusive=True,
    ),
    Param(
        "ridge",
        "float",
        1.0,
        "L2 penalty of the surrogate's coefficients (lime's Ridge alpha)",
        minimum=0.0,
        maximum=1e6,
    ),
)


def lime_samples(n_samples: int, n_features: int, generator: torch.Generator) -> np.ndarray:
    """bool ``(n_samples, n_features)``: row 0 all on, then each feature on with p = 1/2."""
    on = torch.rand((n_samples, n_features), generator=generator) < 0.5
    on[0] = True
    return on.numpy()


def lime_weights(on: np.ndarray, kernel_width: float) -> np.ndarray:
    """``exp(-d^2 / (2 w^2))``, ``d`` the cosine distance from ``z`` to all-ones."""
    distance = 1.0 - np.sqrt(on.sum(axis=1) / on.shape[1])
    return np.exp(-(distance**2) / (2.0 * kernel_width**2))


@register_method(
    "lime",
    backend="onnx",
    needs_gradients=False,
    params=PARAMS,
    validate=validate,
    cost=cost,
    description="Ridge surrogate of the target logit over random superpixel subsets, "
    "weighted by closeness to the image (Ribeiro et al. 2016, LIME)",
    paper=RIBEIRO_2016,
)
def lime(
    ctx: ExplainContext,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    n_samples: int,
    n_segments: int,
    compactness: float,
    baseline: str,
    kernel_width: float,
    ridge: float,
) -> Attribution:
    """LIME over SLIC superpixels (the module docstring states every convention).

    Args:
        ctx: request context; ``forward_numpy``, ``generator``, ``chunk_size``, deadline.
        inputs: ``(B, C, H, W)`` pixels in ``[0, 1]``.
        targets: ``(B,)`` class to explain per image.
        n_samples, n_segments, compactness, baseline, kernel_width, ridge: see
            ``PARAMS``.

    Returns:
        ``Attribution`` with float32 ``(B, H, W)`` maps: each pixel its superpixel's
        coefficient, in logit units. Costs ``B * n_samples`` forwards.

    Raises:
        DeadlineExceededError: the deadline passed between chunks; no map is returned.

    Paper: https://arxiv.org/abs/1602.04938
    """
    return surrogate_maps(
        ctx,
        inputs,
        targets,
        "lime",
        (n_segments, compactness, baseline),
        n_samples,
        lime_samples,
        lambda on: lime_weights(on, kernel_width),
        ridge,
    )
