"""Sobol attribution (Fel et al. 2021, "Look at the Variance!"), on ONNX Runtime.

Each cell of a ``grid_size x grid_size`` grid is a random variable in ``[0, 1]`` that scales
its region of the image ("inpainting" towards 0, the paper's default, or towards a blurred
copy). Two quasi-Monte Carlo matrices ``A`` and ``B`` of ``n_designs`` points come from one
scrambled Sobol sequence of dimension ``2 * grid_size**2``; ``C_i`` is ``A`` with column
``i`` taken from ``B``. Jansen's estimator gives each cell's total-order index

    ST_i = mean_j (f(A_j) - f(C_ij))^2 / (2 Var(f(A)))

which counts the cell's own effect *and* all its interactions with other cells. The
``grid_size**2`` indices are upsampled to the input size bicubically, as in the authors'
code. The sequence comes from ``torch.quasirandom.SobolEngine`` (scrambled, seeded
from the request's generator) so no SciPy is needed.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch

from service.engine import perturb
from service.engine.methods.rise import check_grid
from service.engine.ops import box_blur
from service.engine.registry import InputShape, Param, ResolvedParams, register_method
from service.engine.types import Attribution, ExplainContext
from service.protocol.cost import Cost
from service.protocol.errors import InvalidInputError

PERTURBATIONS = ("inpainting", "blurring")
PARAMS = (
    # The design holds n_designs * (grid_size**2 + 2) rows of grid_size**2 cells, and each
    # row costs one forward per image: what a request may ask is the per-request budget's
    # call (see cost below). The bounds are the method's own: SobolEngine draws at most
    # 21,201 dimensions (2 * cells: grid 102), and 2**14 designs at the smallest grid is
    # already ~50,000 forwards.
    Param("grid_size", "int", 8, "cells per side of the grid", minimum=1, maximum=32),
    Param(
        "n_designs",
        "int",
        32,
        "points of each quasi-Monte Carlo matrix (a power of two)",
        minimum=2,
        maximum=2**14,
    ),
    # Blurring by default: on the default model, inpainting towards black (the paper's
    # default) scored 0.25 on the pointing game against 0.94 for blurring
    # (bench/quality.py): black cells are far outside what the model saw.
    Param(
        "perturbation",
        "str",
        "blurring",
        "cells scale towards 0 (inpainting) or towards a 10x10 box blur (blurring)",
        choices=PERTURBATIONS,
    ),
)


def _validate(params: ResolvedParams, input_shape: InputShape | None) -> None:
    n_designs = int(params["n_designs"])
    if n_designs & (n_designs - 1):
        raise InvalidInputError(f"n_designs must be a power of two, got {n_designs}")
    check_grid(int(params["grid_size"]), input_shape)


def cost(params: ResolvedParams, input_shape: InputShape) -> Cost:
    """``n_designs * (cells + 2)`` forwards. Building the design holds the matrices ``C_i``
    (float32, ``cells x n_designs x cells``) and their concatenation with ``A`` and ``B``
    at once, after the float64 draw of ``A | B``."""
    _, height, width = input_shape
    n_designs, cells = int(params["n_designs"]), int(params["grid_size"]) ** 2
    design = 4 * n_designs * cells * (2 * cells + 2) + 24 * n_designs * cells
    return Cost(forwards=n_designs * (cells + 2), memory_bytes=design + 8 * height * width)


def sobol_design(dims: int, n_designs: int, seed: int) -> np.ndarray:
    """Stacked low-resolution masks ``[A; B; C_1; ...; C_dims]``: ``(n_designs*(dims+2), dims)``.

    Args:
        dims: number of grid cells.
        n_designs: points of ``A`` (and ``B``); a power of two keeps the Sobol sequence
            balanced.
        seed: scrambling seed.
    """
    engine = torch.quasirandom.SobolEngine(dimension=2 * dims, scramble=True, seed=seed)
    ab = engine.draw(n_designs, dtype=torch.float64).numpy().astype(np.float32)
    a, b = ab[:, :dims], ab[:, dims:]
    c = np.repeat(a[None], dims, axis=0)  # (dims, n_designs, dims)
    cell = np.arange(dims)
    c[cell, :, cell] = b.T
    return np.concatenate([a, b, c.reshape(-1, dims)], axis=0)


def jansen_total_order(outputs: np.ndarray, n_designs: int, dims: int) -> np.ndarray:
    """Jansen (1999) total-order indices from outputs ordered as :func:`sobol_design`.

    Args:
        outputs: ``(n_designs * (dims + 2),)`` model outputs.
        n_designs: points per design matrix.
        dims: number of variables.

    Returns:
        ``(dims,)`` float64; all zeros when ``f(A)`` has no variance (nothing to explain).
    """
    f_a = outputs[:n_designs]
    f_c = outputs[2 * n_designs :].reshape(dims, n_designs)
    var = float(np.var(f_a, ddof=1)) if n_designs > 1 else 0.0
    if not var > 0.0:
        return np.zeros(dims)
    return np.mean((f_a[None] - f_c) ** 2, axis=1) / (2.0 * var)


@register_method(
    "sobol",
    backend="onnx",
    needs_gradients=False,
    params=PARAMS,
    validate=_validate,
    description="Total-order Sobol indices of grid cells under quasi-Monte Carlo masks "
    "(Fel et al. 2021)",
    paper="https://arxiv.org/abs/2111.04138",
    cost=cost,
)
def sobol(
    ctx: ExplainContext,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    grid_size: int,
    n_designs: int,
    perturbation: str,
) -> Attribution:
    """Sobol total-order maps over a batch; every image sees the same design.

    Args:
        ctx: request context; ``forward_numpy``, ``generator``, ``chunk_size``, deadline.
        inputs: ``(B, C, H, W)`` pixels in ``[0, 1]``.
        targets: ``(B,)`` class to explain per image.
        grid_size, n_designs, perturbation: see ``PARAMS`` (``"blurring"`` as in the
            authors' code).

    Returns:
        ``Attribution`` with float32 ``(B, H, W)`` maps of total-order indices of the target
        logit. Costs ``B * n_designs * (grid_size**2 + 2)`` forwards.

    Raises:
        DeadlineExceededError: the deadline passed between chunks; no map is returned.
    """
    forward = perturb.require_forward(ctx, "sobol")
    images = perturb.images_numpy(inputs)
    batch, _, height, width = images.shape
    tgt = perturb.targets_numpy(targets, batch)
    dims = grid_size * grid_size
    design = sobol_design(dims, n_designs, perturb.seed_from(ctx.generator))
    if batch == 0:
        return Attribution(maps=torch.zeros((0, height, width)))

    # Nearest-neighbour upsampling (the authors' ``interpolate`` default) as an index map;
    # np.take keeps the masks C-contiguous (fancy indexing would not, and multiplying
    # strided masks costs more than the forward).
    rows = (np.arange(height) * grid_size) // height
    cols = (np.arange(width) * grid_size) // width
    cell_of = rows[:, None] * grid_size + cols[None, :]
    substrate: np.ndarray | None = None
    delta = images
    if perturbation == "blurring":
        substrate = np.stack([box_blur(img) for img in images])
        delta = images - substrate  # x*m + s*(1-m) = s + (x - s)*m

    def build(start: int, stop: int, out: np.ndarray) -> None:
        # Mask-major order: consecutive samples share a design point, as in RISE.
        points = design[start // batch : (stop - 1) // batch + 1]
        masks = np.take(points, cell_of, axis=1)  # (M, H, W), C-contiguous
        perturb.masked_into(out, delta, masks, start, substrate)

    outputs = np.empty((design.shape[0], batch), dtype=np.float64)
    chunks = perturb.pipelined(
        forward,
        design.shape[0] * batch,
        ctx.chunk_size,
        images.shape[1:],
        build,
        ctx.check_deadline,
    )
    for start, stop, _, logits in chunks:
        mask_of, item = np.divmod(np.arange(start, stop), batch)
        outputs[mask_of, item] = perturb.pick(logits, tgt[item])

    maps = np.empty((batch, height, width), dtype=np.float32)
    for b in range(batch):
        sti = jansen_total_order(outputs[:, b], n_designs, dims).astype(np.float32)
        grid = sti.reshape(grid_size, grid_size)
        maps[b] = cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC)
    return Attribution(maps=torch.from_numpy(maps))
