"""Occlusion (Zeiler & Fergus 2014) on the ONNX Runtime forward.

A square window of the baseline value slides over the image; a pixel's attribution is the
drop of the target logit, averaged over every window that covers it. The result equals
Captum's ``Occlusion(model).attribute(x, sliding_window_shapes=(C, w, w), strides=(C, s, s),
baselines=value, target=t)``: Captum returns ``(B, C, H, W)`` with equal channels (the window
spans all channels), and the map here is that common channel, ``(B, H, W)``. As in Captum,
windows start at 0 and step by ``stride`` until they reach the last row/column; the last
window of an axis may be cut off by the border.

Coarse to fine (the default): windows ``coarse`` times larger, at ``coarse`` times the
stride, first map the whole image in a few dozen forwards; then only the ``refine``
fraction of the fine windows whose area the coarse map rates highest are run. A pixel that
some run fine window covers gets their mean drop (inside the refined area, exactly the
exhaustive value); any other pixel the coarse map's value scaled by the ratio of the
windows' areas (a coarse window removes that many times more of the image).
``coarse=1`` or ``refine=1`` is the exhaustive method above, Captum's result.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from service.engine import perturb
from service.engine.registry import InputShape, Param, ResolvedParams, register_method
from service.engine.types import Attribution, ExplainContext
from service.protocol.cost import Cost
from service.protocol.errors import InvalidInputError

MAX_SIDE = 8192  # the longest image side accepted (Limits.max_image_side)
PARAMS = (
    # Both at most the model's input side (the validate hook checks it against the model);
    # the bound here holds for a library caller that gives no input shape.
    Param("window", "int", 16, "side of the square window, in pixels", minimum=1, maximum=MAX_SIDE),
    Param(
        "stride",
        "int",
        8,
        "step between windows, in pixels (at most the window)",
        minimum=1,
        maximum=MAX_SIDE,
    ),
    # Grey, as Zeiler & Fergus occluded: on the default model a black window (0.0) scored
    # 0.875 on the pointing game against 0.94 for grey (bench/quality.py). A pixel value:
    # the model sees pixels in [0, 1], and a value far outside makes its logits overflow
    # into a NaN map.
    Param("baseline", "float", 0.5, "value written into the window", minimum=0.0, maximum=1.0),
    # 4 and 0.2: on the quality bench, 4.1x fewer forwards than every window at the same
    # pointing game and a better deletion AUC (0.1078 against 0.1149); refining 0.15 (5.1x)
    # left parts of objects to the coarse map and lost 0.027 deletion AUC, and a coarse
    # factor of 3 with 0.15 (0.0870) spent 3.8x fewer (bench/results/fewer_forwards.md).
    Param(
        "coarse",
        "int",
        4,
        "first pass with windows and stride this many times larger; 1 runs every window",
        minimum=1,
        maximum=MAX_SIDE,
    ),
    Param(
        "refine",
        "float",
        0.2,
        "fraction of the fine windows run after the coarse pass, those it rates highest; "
        "1 runs every window",
        minimum=0.0,
        maximum=1.0,
        minimum_exclusive=True,
    ),
)


def plan(
    height: int, width: int, window: int, stride: int, coarse: int, refine: float
) -> tuple[list[Box], list[Box], int]:
    """``(fine boxes, coarse boxes, fine windows run per image)``; no coarse boxes when
    the parameters ask for every window."""
    fine = boxes(height, width, window, stride)
    if coarse == 1 or refine >= 1.0:
        return fine, [], len(fine)
    # At most half the shorter side: one window over the whole image would rate every
    # fine window alike. Never below the fine window.
    coarse_window = max(window, min(window * coarse, min(height, width) // 2))
    coarse_boxes = boxes(height, width, coarse_window, min(stride * coarse, coarse_window))
    return fine, coarse_boxes, min(len(fine), math.ceil(refine * len(fine)))


def cost(params: ResolvedParams, input_shape: InputShape) -> Cost:
    """One forward for the unoccluded image, one per coarse window and one per fine window
    run; float64 sums and counts per pass."""
    _, height, width = input_shape
    window, stride, coarse = (int(params[name]) for name in ("window", "stride", "coarse"))
    fine, coarse_boxes, refined = plan(
        height, width, window, stride, coarse, float(params["refine"])
    )
    windows = len(fine) + len(coarse_boxes)
    # A window's box is a tuple of four ints, ~100 bytes in Python.
    return Cost(
        forwards=1 + len(coarse_boxes) + refined, memory_bytes=32 * height * width + 100 * windows
    )


def _validate(params: ResolvedParams, input_shape: InputShape | None) -> None:
    window, stride = int(params["window"]), int(params["stride"])
    if stride > window:
        # Captum refuses this too: pixels between windows would have no attribution.
        raise InvalidInputError(f"occlusion stride {stride} must not exceed window {window}")
    if input_shape is not None and window > min(input_shape[1:]):
        height, width = input_shape[1:]
        raise InvalidInputError(
            f"occlusion window {window} is larger than the model's {height}x{width} input"
        )


def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Captum's window origins along one axis: ``ceil((size - window) / stride) + 1`` steps."""
    count = math.ceil((size - window) / stride) + 1
    return [i * stride for i in range(count)]


Box = tuple[int, int, int, int]  # y0, y1, x0, x1


def boxes(height: int, width: int, window: int, stride: int) -> list[Box]:
    """Every window's box, row by row, cut off at the border."""
    return [
        (y, min(y + window, height), x, min(x + window, width))
        for y in window_starts(height, window, stride)
        for x in window_starts(width, window, stride)
    ]


@register_method(
    "occlusion",
    backend="onnx",
    needs_gradients=False,
    params=PARAMS,
    validate=_validate,
    description="Drop of the target logit when a sliding square window is set to a baseline "
    "(Zeiler & Fergus 2014)",
    paper="https://arxiv.org/abs/1311.2901",
    cost=cost,
)
def occlusion(
    ctx: ExplainContext,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    window: int,
    stride: int,
    baseline: float,
    coarse: int,
    refine: float,
) -> Attribution:
    """Occlusion maps over a batch, forwards batched by ``ctx.chunk_size``.

    Args:
        ctx: request context; only ``forward_numpy``, ``chunk_size`` and the deadline are used.
        inputs: ``(B, C, H, W)`` pixels in ``[0, 1]``.
        targets: ``(B,)`` class to explain per image.
        window, stride, baseline, coarse, refine: see ``PARAMS`` (checked before the
            call: stride at most the window, window at most the image).

    Returns:
        ``Attribution`` with float32 ``(B, H, W)`` maps: mean drop of the target logit over
        the run windows covering each pixel (see the module). Costs ``B * (1 + windows
        run)`` forwards: :func:`cost`.

    Raises:
        DeadlineExceededError: the deadline passed between chunks; no map is returned.
    """
    forward = perturb.require_forward(ctx, "occlusion")
    images = perturb.images_numpy(inputs)
    batch, _, height, width = images.shape
    tgt = perturb.targets_numpy(targets, batch)
    if batch == 0:
        return Attribution(maps=torch.zeros((0, height, width)))

    fine, coarse_boxes, refined = plan(height, width, window, stride, coarse, refine)
    check = ctx.check_deadline
    base = np.empty(batch, dtype=np.float64)
    for start, stop in perturb.chunks(batch, ctx.chunk_size, check):
        logits = forward(images[start:stop])
        base[start:stop] = perturb.pick(logits, tgt[start:stop])

    def occlude(items: np.ndarray, chosen: np.ndarray, grid: list[Box]) -> np.ndarray:
        """``(B, 2, H, W)`` float64: per image, the sums of the drops of its windows
        ``grid[chosen[i]]`` (for image ``items[i]``) over each pixel, and their counts."""
        acc = np.zeros((batch, 2, height, width), dtype=np.float64)

        def build(start: int, stop: int, out: np.ndarray) -> None:
            np.take(images, items[start:stop], axis=0, out=out)
            for row, k in enumerate(chosen[start:stop]):
                y0, y1, x0, x1 = grid[k]
                out[row, :, y0:y1, x0:x1] = baseline

        chunks = perturb.pipelined(
            forward, items.size, ctx.chunk_size, images.shape[1:], build, check
        )
        for start, stop, _, logits in chunks:
            item = items[start:stop]
            drop = base[item] - perturb.pick(logits, tgt[item]).astype(np.float64)
            for row, (b, k) in enumerate(zip(item, chosen[start:stop], strict=True)):
                y0, y1, x0, x1 = grid[k]
                acc[b, 0, y0:y1, x0:x1] += drop[row]
                acc[b, 1, y0:y1, x0:x1] += 1.0
        return acc

    if not coarse_boxes:
        item, box = np.divmod(np.arange(batch * len(fine)), len(fine))
        sums, counts = occlude(item, box, fine).transpose(1, 0, 2, 3)
        return Attribution(maps=torch.from_numpy((sums / counts).astype(np.float32)))

    item, box = np.divmod(np.arange(batch * len(coarse_boxes)), len(coarse_boxes))
    sums, counts = occlude(item, box, coarse_boxes).transpose(1, 0, 2, 3)
    coarse_maps = sums / counts  # every pixel lies in a coarse window
    area = ((fine[0][1] - fine[0][0]) * (fine[0][3] - fine[0][2])) / (
        (coarse_boxes[0][1] - coarse_boxes[0][0]) * (coarse_boxes[0][3] - coarse_boxes[0][2])
    )
    # The coarse map is the first anytime map: a few dozen forwards into the call.
    ctx.report_progress(lambda: coarse_maps * area, batch * (1 + len(coarse_boxes)))
    chosen = np.stack([_best_boxes(m, fine, refined) for m in coarse_maps])
    items = np.repeat(np.arange(batch), refined)
    sums, counts = occlude(items, chosen.ravel(), fine).transpose(1, 0, 2, 3)
    with np.errstate(invalid="ignore", divide="ignore"):
        maps = np.where(counts > 0, sums / counts, coarse_maps * area)
    return Attribution(maps=torch.from_numpy(maps.astype(np.float32)))


def _best_boxes(coarse_map: np.ndarray, grid: list[Box], count: int) -> np.ndarray:
    """Indices of the ``count`` boxes of ``grid`` with the highest mean of ``coarse_map``
    (ties: the earlier box), from a summed-area table: one pass, not one per box."""
    table = np.zeros((coarse_map.shape[0] + 1, coarse_map.shape[1] + 1))
    table[1:, 1:] = coarse_map.cumsum(axis=0).cumsum(axis=1)
    y0, y1, x0, x1 = np.array(grid).T
    total = table[y1, x1] - table[y0, x1] - table[y1, x0] + table[y0, x0]
    mean = total / ((y1 - y0) * (x1 - x0))
    return np.argsort(-mean, kind="stable")[:count]
