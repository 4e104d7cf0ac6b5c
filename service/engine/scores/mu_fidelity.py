"""MuFidelity (Bhatt et al. 2020): does removing salient pixels cost what the map says?

Random subsets of the cells of a coarse grid are set to a baseline; the score is the
Pearson correlation, across subsets, between the saliency removed and the drop of the
target logit. Logits, not probabilities, because attributions are additive in the logit
and softmax saturates. In ``[-1, 1]``; higher is better. Costs ``N * (n_subsets + 1)``
forwards.
"""

from __future__ import annotations

import numpy as np

from service.engine import perturb
from service.engine.registry import InputShape, Param, ResolvedParams, register_score
from service.engine.scores.base import ScoreContext, check_inputs
from service.engine.types import NumpyForward
from service.protocol.cost import Cost

BHATT_2020 = "https://arxiv.org/abs/2005.00631"
N_SUBSETS, SUBSET_FRACTION, GRID_SIZE, BASELINE = 128, 0.2, 9, 0.0
PARAMS = (
    Param(
        "n_subsets",
        "int",
        N_SUBSETS,
        "random subsets per image (the same for every image)",
        minimum=2,
        maximum=4096,
    ),
    Param(
        "subset_fraction",
        "float",
        SUBSET_FRACTION,
        "fraction of the grid cells set to the baseline in each subset",
        minimum=0.0,
        maximum=1.0,
        minimum_exclusive=True,
        maximum_exclusive=True,
    ),
    Param(
        "grid_size",
        "int",
        GRID_SIZE,
        "cells per side of the grid the subsets are drawn on (Xplique uses 9)",
        minimum=1,
        maximum=64,
    ),
    # A pixel value, as occlusion's: far outside [0, 1] the logits overflow.
    Param("baseline", "float", BASELINE, "value of removed pixels", minimum=0.0, maximum=1.0),
)


def cost(params: ResolvedParams, input_shape: InputShape) -> Cost:
    """A forward for the image and one per subset. Every subset's removed pixels are held
    at once, as booleans and as a float64 copy for the saliency sums (9 bytes a pixel)."""
    _, height, width = input_shape
    n_subsets, cells = int(params["n_subsets"]), int(params["grid_size"]) ** 2
    return Cost(forwards=n_subsets + 1, memory_bytes=n_subsets * (cells + 9 * height * width))


def mu_fidelity(
    forward: NumpyForward,
    images: np.ndarray,
    maps: np.ndarray,
    targets: np.ndarray,
    *,
    n_subsets: int = N_SUBSETS,
    subset_fraction: float = SUBSET_FRACTION,
    grid_size: int = GRID_SIZE,
    baseline: float = BASELINE,
    seed: int = 0,
    chunk_size: int = 32,
    check: perturb.Check | None = None,
) -> np.ndarray:
    """MuFidelity: correlation of removed saliency with the drop of the target logit.

    Args:
        forward: ``(N, C, H, W) -> (N, K)`` logits.
        images: float32 ``(N, C, H, W)`` pixels in ``[0, 1]``.
        maps: ``(N, H, W)`` saliency.
        targets: ``(N,)`` class per image.
        n_subsets, subset_fraction, grid_size, baseline: see ``PARAMS``.
        seed: seed of the subsets, for reproducible scores.
        chunk_size: perturbed images per forward.
        check: called before every forward; raises to stop (deadline).

    Returns:
        float64 ``(N,)`` Pearson correlations in ``[-1, 1]``; 0 where either side has no
        variance (a constant map, or a model blind to every subset).

    Paper: https://arxiv.org/abs/2005.00631
    """
    images, maps, targets = check_inputs(images, maps, targets)
    n, _, h, w = images.shape
    cells = grid_size * grid_size
    cell_of = ((np.arange(h) * grid_size) // h)[:, None] * grid_size + (
        (np.arange(w) * grid_size) // w
    )[None, :]
    rng = np.random.default_rng(seed)
    size = max(1, round(subset_fraction * cells))
    chosen = np.zeros((n_subsets, cells), dtype=bool)
    for s in range(n_subsets):
        chosen[s, rng.choice(cells, size=size, replace=False)] = True
    removed = chosen[:, cell_of]  # (S, H, W)
    saliency_removed = removed.reshape(n_subsets, -1).astype(np.float64) @ maps.reshape(n, -1).T

    base = np.empty(n, dtype=np.float64)
    for start, stop in perturb.chunks(n, chunk_size, check):
        base[start:stop] = perturb.pick(forward(images[start:stop]), targets[start:stop])
    drop = np.empty((n_subsets, n), dtype=np.float64)
    fill = np.float32(baseline)

    def build(start: int, stop: int, out: np.ndarray) -> None:
        subset, item = np.divmod(np.arange(start, stop), n)
        out[...] = np.where(removed[subset][:, None], fill, images[item])

    for start, stop, _, logits in perturb.pipelined(
        forward, n_subsets * n, chunk_size, images.shape[1:], build, check
    ):
        subset, item = np.divmod(np.arange(start, stop), n)
        drop[subset, item] = base[item] - perturb.pick(logits, targets[item])
    return _pearson(saliency_removed, drop)


def _pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Column-wise Pearson correlation of two ``(S, N)`` arrays; 0 where undefined."""
    a = a - a.mean(axis=0)
    b = b - b.mean(axis=0)
    denom = np.sqrt((a * a).sum(axis=0) * (b * b).sum(axis=0))
    num = (a * b).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = np.where(denom > 1e-12 * (1.0 + np.abs(num)), num / denom, 0.0)
    return np.clip(corr, -1.0, 1.0)


@register_score(
    "mu_fidelity",
    params=PARAMS,
    higher_is_better=True,
    description="Correlation between saliency removed and score drop over random subsets "
    "(Bhatt et al. 2020, Evaluating and Aggregating Feature-based Model Explanations)",
    paper=BHATT_2020,
    cost=cost,
)
def mu_fidelity_score(
    ctx: ScoreContext,
    images: np.ndarray,
    maps: np.ndarray,
    targets: np.ndarray,
    *,
    n_subsets: int,
    subset_fraction: float,
    grid_size: int,
    baseline: float,
) -> np.ndarray:
    """:func:`mu_fidelity` with the call's seed, chunk size and check."""
    return mu_fidelity(
        ctx.forward,
        images,
        maps,
        targets,
        n_subsets=n_subsets,
        subset_fraction=subset_fraction,
        grid_size=grid_size,
        baseline=baseline,
        seed=ctx.seed,
        chunk_size=ctx.chunk_size,
        check=ctx.check,
    )
