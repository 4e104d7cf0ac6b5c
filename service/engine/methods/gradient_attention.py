"""Gradient-weighted attention (Chefer et al. 2021, "Generic Attention-model Explainability").

Conventions:

* Attention probabilities ``A`` ``(N, heads, T, T)`` of every self-attention are captured as
  the model runs (:mod:`service.engine.attention`), and their gradients ``dS_t / dA`` of the
  target logit are exact: taken with respect to the very tensors that multiply the values.
* Per layer, in forward order: ``Abar = mean_heads(ReLU(dS_t/dA * A))`` and the relevance,
  starting from the identity, is updated as ``R = R + Abar @ R`` (the paper's eq. 6 for
  self-attention).
* The map is the rows of ``R`` that the target logit reads at the last attention layer
  (the rows whose gradient there is not zero: the class token for a class-token head, the
  patch tokens for an average-pooled one), averaged, over the patch columns (class and
  register tokens dropped), on the patch grid, upsampled bilinearly to the input. Where the
  logit reads the class token this is the paper's ``R[0, 1:]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from service.engine.attention import capture_attention
from service.engine.attention_info import AttentionInfo
from service.engine.methods.attention_rollout import max_tokens, patch_maps
from service.engine.methods.gradient import target_logits
from service.engine.registry import InputShape, ResolvedParams, register_method
from service.engine.types import Attribution, ExplainContext
from service.protocol.cost import Cost

CHEFER_2021 = "https://arxiv.org/abs/2103.15679"


def cost(params: ResolvedParams, input_shape: InputShape) -> Cost:
    """One gradient row; the float32 ``T x T`` relevance and one layer's product per image."""
    return Cost(backward_rows=1, memory_bytes=8 * max_tokens(input_shape) ** 2)


@register_method(
    "gradient_weighted_attention",
    backend="torch",
    needs_gradients=True,
    needs_attention=True,
    description=(
        "Relevance of each patch to the target, from attention weighted by its gradient "
        "and propagated through the layers (Chefer et al. 2021, generic attention "
        "explainability)"
    ),
    paper=CHEFER_2021,
    cost=cost,
)
def gradient_weighted_attention(
    ctx: ExplainContext, inputs: torch.Tensor, targets: torch.Tensor
) -> Attribution:
    """Chefer et al.'s relevance for self-attention, read at the target's readout rows.

    Args:
        ctx: engine context (model, ``attention``).
        inputs: ``(B, C, H, W)`` pixels in ``[0, 1]``.
        targets: ``(B,)`` class to explain per item.

    Returns:
        Non-negative maps ``(B, H, W)``, bilinearly upsampled from the patch grid.

    Paper: https://arxiv.org/abs/2103.15679
    """

    def relevance_map(model: nn.Module, info: AttentionInfo, part: slice) -> torch.Tensor:
        # The input requires grad so that every attention is in the graph; gradients are
        # taken with respect to the attentions only.
        rows = inputs[part].detach().requires_grad_(True)
        with torch.enable_grad():
            with capture_attention() as capture:
                selected = target_logits(model(rows), targets[part])
            calls = info.checked(capture, rows.shape[0])
            grads = torch.autograd.grad(
                selected.sum(), [call.probs for call in calls], allow_unused=True
            )
        relevance = info.identity(calls)
        for call, grad in zip(calls, grads, strict=True):
            attention = call.view()
            last = torch.zeros_like(attention) if grad is None else call.view(grad)
            weighted = F.relu(last * attention).mean(dim=1)
            relevance = relevance + weighted @ relevance
        return info.patch_map(relevance, _readout_rows(last, info.readout))

    return patch_maps(ctx, inputs, relevance_map)


def _readout_rows(last_grad: torch.Tensor, recorded: tuple[int, ...]) -> torch.Tensor:
    """``(B, T)`` equal weights on the rows the target logit reads at the last attention.

    An image whose target logit reads no row there (a logit that is constant in the
    attention) falls back to the rows ``archive`` recorded for any logit.
    """
    reached = (last_grad.abs().sum(dim=(1, 3)) > 0).float()
    fallback = torch.zeros_like(reached)
    fallback[:, list(recorded)] = 1.0
    reached = torch.where(reached.sum(dim=1, keepdim=True) > 0, reached, fallback)
    return reached / reached.sum(dim=1, keepdim=True)
