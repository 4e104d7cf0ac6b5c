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

The default design is small: a 7 x 7 grid and 4 points, ``4 * (49 + 2) = 204`` forwards
per image (issue 13: at most 256 at 224 px, where a cell is then 32 px). The previous
default, ``grid_size=8, n_designs=32`` (2,112 forwards), stays reachable by those params.
On the quality bench (``bench/results/fewer_forwards.md``, 24 images, three seeds) the
default's pointing game was 1.000, 0.958 and 0.958 against the previous default's 0.958,
0.958 and 0.917, and its deletion AUC 0.0943, 0.1066 and 0.1000 against 0.0951, 0.0953 and
0.0870 (lower is better): 4 points are noisy, and deletion AUC is up to 0.013 worse. Ask
for more ``n_designs`` when a map must not depend on the seed.
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
    #
    # Grid 7 and 4 designs (4 x 51 = 204 forwards; grid 8 and 32 designs spent 2,112): on
    # the quality bench (bench/results/fewer_forwards.md) the same or a better pointing
    # game over three seeds, deletion AUC 0.001 better to 0.013 worse. A cell's own index
    # beat more designs on fewer cells (grid 5 with 8 designs, 216 forwards: pointing game
    # 0.875, deletion AUC 0.1195; grid 6 with 4, 152: 0.917 and 0.1255) and a coarse first
    # pass picking the cells to refine on grid 8 (216 to 240 forwards: 0.917 to 1.000 but
    # 0.108 to 0.127), all with seed 0. At 224 px a cell is 32 px, ResNet's and ViT-B/32's
    # last grid (candidates: the screen at the end of that file). grid 8, n_designs 32:
    # the previous default.
    Param("grid_size", "int", 7, "cells per side of the grid", minimum=1, maximum=32),
    Param(
        "n_designs",
        "int",
        4,
        "most points of each quasi-Monte Carlo matrix (a power of two); all of them when "
        "tolerance is 0",
        minimum=2,
        maximum=2**14,
    ),
    Param(
        "min_designs",
        "int",
        4,
        "points before the first look at the indices (a power of two); it doubles until n_designs",
        minimum=2,
        maximum=2**14,
    ),
    # 0 (no early stop) by default: with 0.1 (grid 8, 32 designs) the quality bench spent
    # 3.3x fewer forwards but lost 0.04 pointing game and 0.017 deletion AUC (the run
    # before issue 13's Sobol default, bench/results/fewer_forwards.md), so early stopping
    # is the user's choice, not a silent default.
    Param(
        "tolerance",
        "float",
        0.0,
        "stop once the indices' rank order (Spearman) moved less than this between looks; "
        "0 never stops early",
        minimum=0.0,
        maximum=1.0,
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
    for name in ("n_designs", "min_designs"):
        value = int(params[name])
        if value & (value - 1):
            # Only a power-of-two prefix of a Sobol sequence is balanced; every look at
            # the indices (min_designs, doubling) is such a prefix.
            raise InvalidInputError(f"{name} must be a power of two, got {value}")
    check_grid(int(params["grid_size"]), input_shape)


def cost(params: ResolvedParams, input_shape: InputShape) -> Cost:
    """At most ``n_designs * (cells + 2)`` forwards (the stopping rule may use fewer).
    Building a look's design holds its matrices ``C_i`` (float32, ``cells x n x cells``)
    and their concatenation with ``A`` and ``B`` at once, after the float64 draw of
    ``A | B``; the last look's ``n`` is at most ``n_designs``."""
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
    return sobol_design_from(engine.draw(n_designs, dtype=torch.float64).numpy(), dims)


def sobol_design_from(a_and_b: np.ndarray, dims: int) -> np.ndarray:
    """:func:`sobol_design` from drawn points ``(n, 2 * dims)``: ``A`` is the first ``dims``
    columns, ``B`` the rest; float32 ``(n * (dims + 2), dims)``."""
    ab = a_and_b.astype(np.float32)
    a, b = ab[:, :dims], ab[:, dims:]
    c = np.repeat(a[None], dims, axis=0)  # (dims, n, dims)
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
    f_c = outputs[2 * n_designs :].reshape(dims, n_designs)
    return jansen_from(outputs[:n_designs], f_c)


def jansen_from(f_a: np.ndarray, f_c: np.ndarray) -> np.ndarray:
    """:func:`jansen_total_order` from ``f(A)`` ``(n,)`` and ``f(C_i)`` ``(dims, n)``."""
    n_designs = f_a.shape[0]
    var = float(np.var(f_a, ddof=1)) if n_designs > 1 else 0.0
    if not var > 0.0:
        return np.zeros(f_c.shape[0])
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
    min_designs: int,
    tolerance: float,
    perturbation: str,
) -> Attribution:
    """Sobol total-order maps over a batch; every image sees the same design.

    Args:
        ctx: request context; ``forward_numpy``, ``generator``, ``chunk_size``, deadline.
        inputs: ``(B, C, H, W)`` pixels in ``[0, 1]``.
        targets: ``(B,)`` class to explain per image.
        grid_size, n_designs, min_designs, tolerance, perturbation: see ``PARAMS``
            (``"blurring"`` as in the authors' code). Each image estimates its indices
            from the first ``min_designs``, ``2 min_designs``, ... points and stops once
            their rank order holds to ``tolerance``
            (:func:`~service.engine.perturb.until_stable`); ``tolerance=0`` spends all
            ``n_designs``, the fixed design of the paper.

    Returns:
        ``Attribution`` with float32 ``(B, H, W)`` maps of total-order indices of the target
        logit. Costs at most ``B * n_designs * (grid_size**2 + 2)`` forwards.

    Raises:
        DeadlineExceededError: the deadline passed between chunks; no map is returned.
    """
    forward = perturb.require_forward(ctx, "sobol")
    images = perturb.images_numpy(inputs)
    batch, _, height, width = images.shape
    tgt = perturb.targets_numpy(targets, batch)
    dims = grid_size * grid_size
    engine = torch.quasirandom.SobolEngine(
        dimension=2 * dims, scramble=True, seed=perturb.seed_from(ctx.generator)
    )
    # The whole sequence up front: a look at the first n points sees the same points
    # whatever the ceiling, and sobol_design(dims, n, seed) equals its first n rows.
    a_and_b = engine.draw(n_designs, dtype=torch.float64).numpy().astype(np.float32)
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

    # f(A_j), f(B_j), f(C_ij) per image, filled a look at a time.
    f_a = np.zeros((batch, n_designs))
    f_c = np.zeros((batch, dims, n_designs))

    def run(lo: int, hi: int, active: np.ndarray) -> None:
        count, points = active.size, hi - lo
        design = sobol_design_from(a_and_b[lo:hi], dims)
        sub_delta = delta[active]
        sub_substrate = None if substrate is None else substrate[active]

        def build(start: int, stop: int, out: np.ndarray) -> None:
            # Mask-major order: consecutive samples share a design point, as in RISE.
            chunk = design[start // count : (stop - 1) // count + 1]
            masks = np.take(chunk, cell_of, axis=1)  # (M, H, W), C-contiguous
            perturb.masked_into(out, sub_delta, masks, start, sub_substrate)

        chunks = perturb.pipelined(
            forward, design.shape[0] * count, ctx.chunk_size, images.shape[1:], build,
            ctx.check_deadline,
        )  # fmt: skip
        outputs = np.empty((design.shape[0], count), dtype=np.float64)
        for start, stop, _, logits in chunks:
            row, slot = np.divmod(np.arange(start, stop), count)
            outputs[row, slot] = perturb.pick(logits, tgt[active[slot]])
        f_a[active, lo:hi] = outputs[:points].T
        f_c[active, :, lo:hi] = (
            outputs[2 * points :].reshape(dims, points, count).transpose(2, 0, 1)
        )

    def indices(item: int, used: int) -> np.ndarray:
        return jansen_from(f_a[item, :used], f_c[item, :, :used])

    def upsampled(used: np.ndarray) -> np.ndarray:
        maps = np.empty((batch, height, width), dtype=np.float32)
        for b in range(batch):
            sti = indices(b, int(used[b])).astype(np.float32)
            grid = sti.reshape(grid_size, grid_size)
            maps[b] = cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC)
        return maps

    def looked(used: np.ndarray) -> None:
        ctx.report_progress(lambda: upsampled(used), int(used.sum()) * (dims + 2))

    checkpoints = perturb.doubling(min_designs, n_designs)
    used = perturb.until_stable(checkpoints, batch, tolerance, run, indices, looked)
    return Attribution(maps=torch.from_numpy(upsampled(used)))
