"""RISE: Randomized Input Sampling for Explanation (Petsiuk et al. 2018), on ONNX Runtime.

Random binary grids (each cell kept with probability ``p_keep``) are upsampled bilinearly
to ``(grid_size + 1) * cell`` pixels and cropped at a random shift, giving smooth masks
whose edges do not sit on a fixed lattice. The map is the mask average weighted by the
target class *probability* of each masked image, divided by ``n_masks * p_keep`` (the
paper's Monte-Carlo estimate of E[f(I . M) | M(x) = 1]).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from service.engine import perturb
from service.engine.errors import InvalidInputError
from service.engine.registry import ParamValue, register_method
from service.engine.types import Attribution, ExplainContext

DEFAULTS: dict[str, ParamValue] = {"n_masks": 1024, "grid_size": 8, "p_keep": 0.5}


class RiseMasks:
    """The masks of one request, drawn up front (tiny) and upsampled a chunk at a time.

    Drawing every random number before the first forward makes the result depend on the
    seed only, not on the chunk size; upsampling lazily keeps memory at one chunk of masks
    instead of ``n_masks`` full-resolution images.
    """

    def __init__(
        self,
        n_masks: int,
        grid_size: int,
        p_keep: float,
        size: tuple[int, int],
        generator: torch.Generator,
    ) -> None:
        self.size = size
        self.cell = (math.ceil(size[0] / grid_size), math.ceil(size[1] / grid_size))
        self.up = ((grid_size + 1) * self.cell[0], (grid_size + 1) * self.cell[1])
        grid = torch.rand((n_masks, 1, grid_size, grid_size), generator=generator) < p_keep
        self.grid = grid.to(torch.float32)
        self.shift_y = torch.randint(0, self.cell[0], (n_masks,), generator=generator).numpy()
        self.shift_x = torch.randint(0, self.cell[1], (n_masks,), generator=generator).numpy()

    def __call__(self, start: int, stop: int) -> np.ndarray:
        """float32 ``(stop - start, H, W)`` masks ``start..stop``."""
        up = F.interpolate(
            self.grid[start:stop], size=self.up, mode="bilinear", align_corners=False
        )
        up_np = up[:, 0].numpy()
        height, width = self.size
        out = np.empty((stop - start, height, width), dtype=np.float32)
        for row in range(stop - start):
            y, x = self.shift_y[start + row], self.shift_x[start + row]
            out[row] = up_np[row, y : y + height, x : x + width]
        return out


@register_method(
    "rise",
    backend="onnx",
    needs_gradients=False,
    defaults=DEFAULTS,
    description="Average of random smooth masks weighted by the target probability "
    "(Petsiuk et al. 2018)",
    paper="https://arxiv.org/abs/1806.07421",
)
def rise(
    ctx: ExplainContext, inputs: torch.Tensor, targets: torch.Tensor, /, **params: object
) -> Attribution:
    """RISE maps over a batch; every image sees the same masks (one draw per request).

    Args:
        ctx: request context; ``forward_numpy``, ``generator``, ``chunk_size``, deadline.
        inputs: ``(B, C, H, W)`` pixels in ``[0, 1]``.
        targets: ``(B,)`` class to explain per image.
        **params: ``n_masks`` (Monte-Carlo samples), ``grid_size`` (cells per side of the
            random grid), ``p_keep`` (probability that a cell is kept).

    Returns:
        ``Attribution`` with float32 ``(B, H, W)`` maps in probability units. Costs
        ``B * n_masks`` forwards.

    Raises:
        DeadlineExceededError: the deadline passed between chunks; no map is returned.
    """
    forward = perturb.require_forward(ctx, "rise")
    n_masks = perturb.positive("n_masks", perturb.int_param(params, DEFAULTS, "n_masks"))
    grid_size = perturb.positive("grid_size", perturb.int_param(params, DEFAULTS, "grid_size"))
    p_keep = perturb.float_param(params, DEFAULTS, "p_keep")
    if not 0.0 < p_keep <= 1.0:
        raise InvalidInputError(f"parameter 'p_keep' must be in (0, 1], got {p_keep}")
    images = perturb.images_numpy(inputs)
    batch, _, height, width = images.shape
    tgt = perturb.targets_numpy(targets, batch)
    if grid_size > min(height, width):
        raise InvalidInputError(f"grid_size {grid_size} exceeds the {height}x{width} image")
    masks = RiseMasks(n_masks, grid_size, p_keep, (height, width), ctx.generator)
    if batch == 0:
        return Attribution(maps=torch.zeros((0, height, width)))

    sal = np.zeros((batch, height * width), dtype=np.float64)
    total = n_masks * batch
    buffer = np.empty((min(ctx.chunk_size, total), *images.shape[1:]), dtype=np.float32)
    # Mask-major order: consecutive samples share a mask, so each chunk upsamples each of
    # its masks once however many images the batch holds.
    for start, stop in perturb.chunks(total, ctx.chunk_size, ctx.check_deadline):
        mask_of, item = np.divmod(np.arange(start, stop), batch)
        first = int(mask_of[0])
        mask_chunk = masks(first, int(mask_of[-1]) + 1)
        chunk = buffer[: stop - start]
        np.multiply(images[item], mask_chunk[mask_of - first, None], out=chunk)
        logits = forward(chunk)
        perturb.check_targets(tgt[item], logits.shape[1])
        prob = perturb.pick(perturb.softmax(logits), tgt[item])
        weights = np.zeros((batch, mask_chunk.shape[0]), dtype=np.float64)
        weights[item, mask_of - first] = prob
        sal += weights @ mask_chunk.reshape(mask_chunk.shape[0], -1)
    maps = (sal / (n_masks * p_keep)).reshape(batch, height, width).astype(np.float32)
    return Attribution(maps=torch.from_numpy(maps))
