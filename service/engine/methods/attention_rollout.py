"""Attention rollout (Abnar & Zuidema 2020): how much of each patch token flows into the readout.

Conventions (shared with ``gradient_weighted_attention`` where they apply):

* Every self-attention's probabilities ``(N, heads, T, T)`` are captured on the torch model
  as it runs (:mod:`service.engine.attention`): ``nn.MultiheadAttention`` /
  ``nn.TransformerEncoderLayer`` and ``F.scaled_dot_product_attention`` models alike.
* Per layer, heads are fused by their mean (the paper), or by ``max`` / ``min`` (the
  options of the common implementation, jacobgil/vit-explain). ``discard_ratio`` then sets
  each image's lowest fraction of fused entries to 0, entry ``(0, 0)`` kept, as that
  implementation does. The residual connection is the identity added before each row is
  normalised to sum 1: ``A' = rownorm(fused + I)``; the rollout is ``R = A'_L ... A'_1``.
* The map is the rows of ``R`` that the model's head reads -- the class token, or the mean
  of the patch rows for an average-pooled head, as ``archive`` recorded them -- over the
  patch columns (class and register tokens dropped), on the patch grid, upsampled
  bilinearly to the input.
* Not class-discriminative, by definition: the map does not depend on the target.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from service.engine.attention import capture_attention
from service.engine.attention_info import AttentionInfo
from service.engine.methods.gradient import require_model, row_chunks
from service.engine.ops import upsample
from service.engine.registry import InputShape, Param, ResolvedParams, register_method
from service.engine.types import Attribution, ExplainContext
from service.protocol.cost import Cost
from service.protocol.errors import UnsupportedMethodError

ABNAR_2020 = "https://arxiv.org/abs/2005.00928"
MIN_PATCH = 8  # the finest patch the memory estimate assumes (ViTs use 8 to 32 px)
MAX_PREFIX = 32  # class and register tokens, at most (the layer finder's bound)
PARAMS = (
    Param(
        "discard_ratio",
        "float",
        0.0,
        "fraction of each layer's lowest fused attention entries set to 0",
        minimum=0.0,
        # Discarding every entry would leave the identity alone: a blank map.
        maximum=0.99,
    ),
    Param(
        "head_fusion",
        "str",
        "mean",
        "how heads are fused per layer",
        choices=("mean", "max", "min"),
    ),
)


def cost(params: ResolvedParams, input_shape: InputShape) -> Cost:
    """One forward without autograd; a float32 ``T x T`` rollout per image, ``T`` at most
    the patch count for 8-pixel patches plus 32 prefix tokens."""
    return Cost(forwards=1, memory_bytes=8 * max_tokens(input_shape) ** 2)


def max_tokens(input_shape: InputShape) -> int:
    """The longest token sequence the memory estimates assume for ``(C, H, W)`` inputs."""
    return input_shape[1] * input_shape[2] // MIN_PATCH**2 + MAX_PREFIX


def require_attention(ctx: ExplainContext) -> AttentionInfo:
    """The model's recorded attention, or ``UnsupportedMethodError``."""
    if ctx.attention is None:
        raise UnsupportedMethodError("this method needs a model with attention layers")
    return ctx.attention


ChunkMap = Callable[[nn.Module, AttentionInfo, slice], torch.Tensor]
"""``(model, attention, rows) -> (b, gh, gw)``: one chunk's maps on the patch grid."""


def patch_maps(ctx: ExplainContext, inputs: torch.Tensor, chunk_map: ChunkMap) -> Attribution:
    """The attention methods' loop: ``chunk_map`` per chunk of rows (the deadline checked
    before each), the patch-grid maps upsampled bilinearly to the input."""
    model, info = require_model(ctx), require_attention(ctx)
    maps = [chunk_map(model, info, part) for part in row_chunks(ctx, inputs.shape[0])]
    return Attribution(maps=upsample(torch.cat(maps), (inputs.shape[-2], inputs.shape[-1])))


def fuse_heads(attention: torch.Tensor, how: str) -> torch.Tensor:
    """``(N, heads, T, T) -> (N, T, T)`` by the heads' mean, max or min."""
    if how == "max":
        return attention.amax(dim=1)
    if how == "min":
        return attention.amin(dim=1)
    return attention.mean(dim=1)


def discard_lowest(fused: torch.Tensor, ratio: float) -> torch.Tensor:
    """``fused`` with each image's lowest ``ratio`` of entries set to 0, entry (0, 0) kept."""
    flat = fused.flatten(1).clone()
    count = int(flat.shape[1] * ratio)
    if count == 0:
        return fused
    corner = flat[:, 0].clone()
    lowest = flat.topk(count, dim=1, largest=False).indices
    flat.scatter_(1, lowest, 0.0)
    flat[:, 0] = corner
    return flat.view_as(fused)


@register_method(
    "attention_rollout",
    backend="torch",
    needs_gradients=False,
    needs_attention=True,
    params=PARAMS,
    description=(
        "Class-independent attention of the readout token(s) to each patch, multiplied "
        "through the layers with the residual identity (Abnar & Zuidema 2020, attention rollout)"
    ),
    paper=ABNAR_2020,
    cost=cost,
)
def attention_rollout(
    ctx: ExplainContext,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    discard_ratio: float,
    head_fusion: str,
) -> Attribution:
    """Attention rollout over every self-attention of the model.

    Args:
        ctx: engine context (model, ``attention``).
        inputs: ``(B, C, H, W)`` pixels in ``[0, 1]``.
        targets: ``(B,)``; unused: rollout does not depend on the class.
        discard_ratio: fraction of the lowest fused entries dropped per layer.
        head_fusion: ``"mean"``, ``"max"`` or ``"min"``.

    Returns:
        Non-negative maps ``(B, H, W)``, bilinearly upsampled from the patch grid.

    Paper: https://arxiv.org/abs/2005.00928
    """

    def rollout_map(model: nn.Module, info: AttentionInfo, part: slice) -> torch.Tensor:
        with torch.no_grad(), capture_attention() as capture:
            model(inputs[part])
        calls = info.checked(capture, inputs[part].shape[0])
        rollout = identity = info.identity(calls)
        for call in calls:
            fused = fuse_heads(call.view(), head_fusion)
            if discard_ratio > 0:
                fused = discard_lowest(fused, discard_ratio)
            layer = fused + identity
            rollout = (layer / layer.sum(dim=-1, keepdim=True)) @ rollout
        return info.patch_map(rollout, info.readout_weights(rollout.shape[0], rollout.device))

    return patch_maps(ctx, inputs, rollout_map)
