"""SmoothGrad, SmoothGrad^2 and VarGrad: statistics of gradients at noisy copies of the input.

Conventions (shared by the three methods, and what a float64 reference must reproduce):

* Noise level is a *fraction of the input range*, as in Smilkov et al. 2017 (sec. 3.1,
  ``sigma / (x_max - x_min)``): ``sigma_b = noise_level * (max(x_b) - min(x_b))`` where the
  max and min run over all pixels and channels of image ``b``. An image that spans
  ``[0, 1]`` gets ``sigma = noise_level``; a low-contrast image gets proportionally less.
  Noisy inputs are not clipped to ``[0, 1]`` (as in the paper).
* Noise: ``z = torch.randn((n_samples, C, H, W), generator=ctx.generator)`` drawn once, the
  first thing the method draws; sample ``s`` of item ``b`` is ``x_b + sigma_b * z_s``. The
  same ``z`` is used for every item, so an item's map depends only on its own image,
  target, parameters and seed -- not on which other requests a server batched it with --
  and not on ``ctx.chunk_size`` either.
* Per-sample gradients are raw ``d logit_t / d x`` (no absolute value before averaging).
  Statistics are per pixel *and channel* over samples, accumulated in float64, then
  reduced over channels by a max as for the vanilla gradient:

  - ``smoothgrad``:    ``max_c |mean_s g|``
  - ``smoothgrad_sq``: ``max_c mean_s g^2``
  - ``vargrad``:       ``max_c var_s g`` (population variance, divides by ``n_samples``)
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from service.engine.methods.gradient import require_model, row_chunks, target_gradients
from service.engine.registry import InputShape, Param, ResolvedParams, register_method
from service.engine.types import Attribution, ExplainContext
from service.protocol.cost import Cost

SMILKOV_2017 = "https://arxiv.org/abs/1706.03825"
ADEBAYO_2018 = "https://arxiv.org/abs/1810.03307"
PARAMS = (
    # The noise of every sample is drawn up front: the per-request budget bounds its memory
    # (see cost below), and the gradient rows; 4,096 is far past any gain (Smilkov: 50).
    Param("n_samples", "int", 16, "noisy copies per image", minimum=1, maximum=4096),
    Param(
        "noise_level",
        "float",
        0.15,
        "noise standard deviation as a fraction of the image's pixel range max - min",
        minimum=0.0,
        # Ten times the image's own range is already pure noise; the bound keeps the
        # noisy inputs (and so the gradients) finite.
        maximum=10.0,
    ),
)


def cost(params: ResolvedParams, input_shape: InputShape) -> Cost:
    """A gradient row per sample; the noise ``z`` (float32, drawn up front) and the two
    float64 accumulators are input-sized."""
    n_samples = int(params["n_samples"])
    return Cost(backward_rows=n_samples, memory_bytes=math.prod(input_shape) * (4 * n_samples + 16))


def noise_sigma(inputs: torch.Tensor, noise_level: float) -> torch.Tensor:
    """Per-image standard deviation ``noise_level * (max - min)``, shape ``(B, 1, 1, 1)``."""
    flat = inputs.flatten(1)
    spread = flat.amax(dim=1) - flat.amin(dim=1)
    return (noise_level * spread).view(-1, 1, 1, 1)


def noisy_rows(
    ctx: ExplainContext, inputs: torch.Tensor, n_samples: int, noise_level: float
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Chunks of noisy copies ``x_b + sigma_b z_s`` with the item each row belongs to.

    Draws ``z`` (the convention above) when iteration starts; rows ``(sample, item)`` are
    flattened (row ``r`` = sample ``r // B``, item ``r % B``) and come ``ctx.chunk_size``
    at a time, the deadline checked before each chunk.

    Yields:
        ``(noisy rows (n, C, H, W), item index (n,))``.
    """
    batch = inputs.shape[0]
    z = torch.randn((n_samples, *inputs.shape[1:]), generator=ctx.generator)
    z = z.to(device=inputs.device, dtype=inputs.dtype)
    sigma = noise_sigma(inputs, noise_level)
    for part in row_chunks(ctx, n_samples * batch):
        rows = torch.arange(part.start, part.stop, device=inputs.device)
        sample, item = rows // batch, rows % batch
        yield inputs[item] + sigma[item] * z[sample], item


def gradient_moments(
    ctx: ExplainContext,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    n_samples: int,
    noise_level: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and mean square over noisy samples of the input gradient, per pixel and channel.

    Returns:
        ``(mean, mean_square)``, float64 ``(B, C, H, W)``.
    """
    model = require_model(ctx)
    total = torch.zeros(inputs.shape, dtype=torch.float64, device=inputs.device)
    total_sq = torch.zeros_like(total)
    for noisy, item in noisy_rows(ctx, inputs, n_samples, noise_level):
        grads, _ = target_gradients(model, noisy, targets[item])
        grads = grads.to(torch.float64)
        total.index_add_(0, item, grads)
        total_sq.index_add_(0, item, grads * grads)
    return total / n_samples, total_sq / n_samples


@register_method(
    "smoothgrad",
    backend="torch",
    needs_gradients=True,
    params=PARAMS,
    description=(
        "Max over channels of |mean gradient| over noisy copies "
        "(Smilkov et al. 2017, SmoothGrad: removing noise by adding noise)"
    ),
    paper=SMILKOV_2017,
    cost=cost,
)
def smoothgrad(
    ctx: ExplainContext,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    n_samples: int,
    noise_level: float,
) -> Attribution:
    """SmoothGrad: ``max_c |mean_s d S_t / d x_c (x + sigma z_s)|``.

    Args:
        ctx: engine context (model, generator, chunk size).
        inputs: ``(B, C, H, W)`` pixels in ``[0, 1]``.
        targets: ``(B,)`` class to explain per item.
        n_samples, noise_level: see ``PARAMS``.

    Returns:
        Non-negative maps ``(B, H, W)``. See the module docstring for the conventions.

    Paper: https://arxiv.org/abs/1706.03825
    """
    mean, _ = gradient_moments(ctx, inputs, targets, n_samples, noise_level)
    return Attribution(maps=mean.abs().amax(dim=1).to(torch.float32))


@register_method(
    "smoothgrad_sq",
    backend="torch",
    needs_gradients=True,
    params=PARAMS,
    description=(
        "Max over channels of the mean squared gradient over noisy copies, SmoothGrad^2 "
        "(Hooker et al. 2019, A Benchmark for Interpretability Methods)"
    ),
    paper="https://arxiv.org/abs/1806.10758",
    cost=cost,
)
def smoothgrad_sq(
    ctx: ExplainContext,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    n_samples: int,
    noise_level: float,
) -> Attribution:
    """SmoothGrad^2: ``max_c mean_s (d S_t / d x_c (x + sigma z_s))^2``.

    Args:
        ctx: engine context (model, generator, chunk size).
        inputs: ``(B, C, H, W)`` pixels in ``[0, 1]``.
        targets: ``(B,)`` class to explain per item.
        n_samples, noise_level: see ``PARAMS``.

    Returns:
        Non-negative maps ``(B, H, W)``. See the module docstring for the conventions.

    Paper: https://arxiv.org/abs/1806.10758
    """
    _, mean_sq = gradient_moments(ctx, inputs, targets, n_samples, noise_level)
    return Attribution(maps=mean_sq.amax(dim=1).to(torch.float32))


@register_method(
    "vargrad",
    backend="torch",
    needs_gradients=True,
    params=PARAMS,
    description=(
        "Max over channels of the gradient variance over noisy copies "
        "(Adebayo et al. 2018, Local Explanation Methods for Deep Neural Networks Lack "
        "Sensitivity to Parameter Values)"
    ),
    paper=ADEBAYO_2018,
    cost=cost,
)
def vargrad(
    ctx: ExplainContext,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    n_samples: int,
    noise_level: float,
) -> Attribution:
    """VarGrad: ``max_c var_s d S_t / d x_c (x + sigma z_s)``.

    Args:
        ctx: engine context (model, generator, chunk size).
        inputs: ``(B, C, H, W)`` pixels in ``[0, 1]``.
        targets: ``(B,)`` class to explain per item.
        n_samples, noise_level: see ``PARAMS``.

    Returns:
        Non-negative maps ``(B, H, W)``. See the module docstring for the conventions.

    Paper: https://arxiv.org/abs/1810.03307
    """
    mean, mean_sq = gradient_moments(ctx, inputs, targets, n_samples, noise_level)
    variance = (mean_sq - mean * mean).clamp_min(0.0)  # float64: no harmful cancellation
    return Attribution(maps=variance.amax(dim=1).to(torch.float32))
