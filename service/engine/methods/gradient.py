"""Input-gradient maps (Simonyan et al. 2013) and the shared gradient helpers.

Only gradients with respect to the input are taken, with ``torch.autograd.grad`` on a
detached leaf copy of the input: nothing is accumulated into parameters' ``.grad`` and the
caller's tensors are never modified.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import nn

from service.engine.registry import InputShape, ResolvedParams, register_method
from service.engine.types import Attribution, ExplainContext
from service.protocol.cost import Cost
from service.protocol.errors import UnsupportedMethodError

SIMONYAN_2013 = "https://arxiv.org/abs/1312.6034"


def one_gradient(params: ResolvedParams, input_shape: InputShape) -> Cost:
    """One gradient row per image, and an input-sized float32 gradient."""
    return Cost(backward_rows=1, memory_bytes=4 * math.prod(input_shape))


def require_model(ctx: ExplainContext) -> nn.Module:
    """The differentiable model, or ``UnsupportedMethodError`` on a forward-only host."""
    if ctx.model is None:
        raise UnsupportedMethodError("this method needs a differentiable (torch) model")
    return ctx.model


def row_chunks(ctx: ExplainContext, n_rows: int) -> Iterator[slice]:
    """Slices of at most ``ctx.chunk_size`` rows; checks the deadline before each chunk."""
    step = max(1, ctx.chunk_size)
    for start in range(0, n_rows, step):
        ctx.check_deadline()
        yield slice(start, min(start + step, n_rows))


def target_logits(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``logits[i, targets[i]]`` for each row, with a clear error for non-classifier outputs."""
    if logits.dim() != 2:
        raise UnsupportedMethodError(
            f"model must return (batch, classes) logits, got shape {tuple(logits.shape)}"
        )
    return logits.gather(1, targets.view(-1, 1)).squeeze(1)


def target_gradients(
    model: nn.Module, rows: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient of each row's target logit with respect to that row, in one pass.

    Rows are independent in an eval-mode model, so the gradient of the *sum* of the target
    logits with respect to the batch is the per-row gradient.

    Args:
        model: differentiable model (eval mode).
        rows: ``(N, C, H, W)`` inputs.
        targets: ``(N,)`` int64 class per row.

    Returns:
        ``(gradients (N, C, H, W), target logits (N,))``, both detached.
    """
    with torch.enable_grad():  # callers may sit inside no_grad / inference_mode
        # A detached alias is a new leaf over the same memory: no copy, and the caller's
        # tensor neither gains requires_grad nor is written to.
        leaf = rows.detach().requires_grad_(True)
        selected = target_logits(model(leaf), targets)
        (grad,) = torch.autograd.grad(selected.sum(), leaf)
    return grad.detach(), selected.detach().float()  # float32 under autocast too


def batch_gradients(
    ctx: ExplainContext, inputs: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """:func:`target_gradients` over a batch in chunks of ``ctx.chunk_size``."""
    model = require_model(ctx)
    if inputs.shape[0] <= ctx.chunk_size:  # one pass: no buffer to copy the result into
        ctx.check_deadline()
        return target_gradients(model, inputs, targets)[0]
    out = torch.empty_like(inputs)
    for part in row_chunks(ctx, inputs.shape[0]):
        out[part], _ = target_gradients(model, inputs[part], targets[part])
    return out


@register_method(
    "vanilla_gradient",
    backend="torch",
    needs_gradients=True,
    description=(
        "Max over colour channels of |d logit / d pixel| "
        "(Simonyan et al. 2013, Deep Inside Convolutional Networks)"
    ),
    paper=SIMONYAN_2013,
    cost=one_gradient,
)
def vanilla_gradient(
    ctx: ExplainContext, inputs: torch.Tensor, targets: torch.Tensor
) -> Attribution:
    """Saliency map of Simonyan et al. 2013, eq. (2)-(3): ``max_c |d S_t / d x_c|``.

    Args:
        ctx: engine context (model).
        inputs: ``(B, C, H, W)`` pixels in ``[0, 1]``.
        targets: ``(B,)`` class to explain per item.

    Returns:
        Non-negative maps ``(B, H, W)``.

    Paper: https://arxiv.org/abs/1312.6034
    """
    grads = batch_gradients(ctx, inputs, targets)
    return Attribution(maps=grads.abs().amax(dim=1))


@register_method(
    "gradient_x_input",
    backend="torch",
    needs_gradients=True,
    description=(
        "Signed sum over colour channels of gradient * input "
        "(Shrikumar et al. 2016, Not Just a Black Box)"
    ),
    paper="https://arxiv.org/abs/1605.01713",
    cost=one_gradient,
)
def gradient_x_input(
    ctx: ExplainContext, inputs: torch.Tensor, targets: torch.Tensor
) -> Attribution:
    """Gradient times input, summed over channels: ``sum_c x_c * d S_t / d x_c``.

    The channel *sum* keeps the sign and makes the map additive: summed over all pixels
    it is the first-order Taylor term of the logit. Pixels in ``[0, 1]`` (black = 0), so a
    black pixel gets no attribution.

    Args:
        ctx: engine context (model).
        inputs: ``(B, C, H, W)`` pixels in ``[0, 1]``.
        targets: ``(B,)`` class to explain per item.

    Returns:
        Signed maps ``(B, H, W)``.

    Paper: https://arxiv.org/abs/1605.01713
    """
    grads = batch_gradients(ctx, inputs, targets)
    return Attribution(maps=(grads * inputs).sum(dim=1))
