"""Occlusion (Zeiler & Fergus 2014) on the ONNX Runtime forward.

A square window of the baseline value slides over the image; a pixel's attribution is the
drop of the target logit, averaged over every window that covers it. The result equals
Captum's ``Occlusion(model).attribute(x, sliding_window_shapes=(C, w, w), strides=(C, s, s),
baselines=value, target=t)``: Captum returns ``(B, C, H, W)`` with equal channels (the window
spans all channels), and the map here is that common channel, ``(B, H, W)``. As in Captum,
windows start at 0 and step by ``stride`` until they reach the last row/column; the last
window of an axis may be cut off by the border.
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
)


def window_count(height: int, width: int, window: int, stride: int) -> int:
    """How many windows cover a ``height x width`` image (see :func:`window_starts`)."""
    return len(window_starts(height, window, stride)) * len(window_starts(width, window, stride))


def cost(params: ResolvedParams, input_shape: InputShape) -> Cost:
    """One forward for the unoccluded image and one per window; float64 sums and counts."""
    _, height, width = input_shape
    windows = window_count(height, width, int(params["window"]), int(params["stride"]))
    # A window's box is a tuple of four ints, ~100 bytes in Python.
    return Cost(forwards=1 + windows, memory_bytes=16 * height * width + 100 * windows)


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
) -> Attribution:
    """Occlusion maps over a batch, forwards batched by ``ctx.chunk_size``.

    Args:
        ctx: request context; only ``forward_numpy``, ``chunk_size`` and the deadline are used.
        inputs: ``(B, C, H, W)`` pixels in ``[0, 1]``.
        targets: ``(B,)`` class to explain per image.
        window, stride, baseline: see ``PARAMS`` (checked before the call: stride at
            most the window, window at most the image).

    Returns:
        ``Attribution`` with float32 ``(B, H, W)`` maps: mean drop of the target logit over
        the windows covering each pixel. Costs ``B * (1 + windows)`` forwards.

    Raises:
        DeadlineExceededError: the deadline passed between chunks; no map is returned.
    """
    forward = perturb.require_forward(ctx, "occlusion")
    images = perturb.images_numpy(inputs)
    batch, _, height, width = images.shape
    tgt = perturb.targets_numpy(targets, batch)
    if batch == 0:
        return Attribution(maps=torch.zeros((0, height, width)))

    boxes = [
        (y, min(y + window, height), x, min(x + window, width))
        for y in window_starts(height, window, stride)
        for x in window_starts(width, window, stride)
    ]
    counts = np.zeros((height, width), dtype=np.float64)
    for y0, y1, x0, x1 in boxes:
        counts[y0:y1, x0:x1] += 1.0

    check = ctx.check_deadline
    base = np.empty(batch, dtype=np.float64)
    for start, stop in perturb.chunks(batch, ctx.chunk_size, check):
        logits = forward(images[start:stop])
        base[start:stop] = perturb.pick(logits, tgt[start:stop])

    def build(start: int, stop: int, out: np.ndarray) -> None:
        item, box = np.divmod(np.arange(start, stop), len(boxes))
        np.take(images, item, axis=0, out=out)
        for row, k in enumerate(box):
            y0, y1, x0, x1 = boxes[k]
            out[row, :, y0:y1, x0:x1] = baseline

    sums = np.zeros((batch, height, width), dtype=np.float64)
    chunks = perturb.pipelined(
        forward, batch * len(boxes), ctx.chunk_size, images.shape[1:], build, check
    )
    for start, stop, _, logits in chunks:
        item, box = np.divmod(np.arange(start, stop), len(boxes))
        drop = base[item] - perturb.pick(logits, tgt[item]).astype(np.float64)
        for row, (b, k) in enumerate(zip(item, box, strict=True)):
            y0, y1, x0, x1 = boxes[k]
            sums[b, y0:y1, x0:x1] += drop[row]
    maps = (sums / counts).astype(np.float32)
    return Attribution(maps=torch.from_numpy(maps))
