"""Class activation maps from one layer: Grad-CAM and Grad-CAM++, on CNN maps and ViT tokens.

Activations are captured per call by a forward hook that only records the calling
thread's forwards (see :mod:`service.engine.layers`), and gradients are taken with
``torch.autograd.grad`` with respect to those activations, so concurrent calls on the same
layer neither see each other's tensors nor need a lock. The hook is removed on every path.

Both maps are ReLU'd at the layer's resolution, then upsampled bilinearly to the input
size (``align_corners=False``, as Captum's ``LayerAttribution.interpolate``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from service.engine.layers import capture_activations
from service.engine.methods.gradient import (
    one_gradient,
    require_model,
    row_chunks,
    target_logits,
)
from service.engine.ops import upsample
from service.engine.registry import register_method
from service.engine.types import Attribution, ExplainContext
from service.protocol.errors import UnsupportedMethodError

SELVARAJU_2017 = "https://arxiv.org/abs/1610.02391"
CHATTOPADHAY_2018 = "https://arxiv.org/abs/1710.11063"
GRADCAM_PP_EPS = 1e-6  # pytorch-grad-cam's stabiliser in the alpha denominator


def layer_activations_and_gradients(
    ctx: ExplainContext, inputs: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Target layer activations ``A`` and ``d S_t / d A``, each ``(B, K, h, w)``, detached.

    A token layer's activations and gradients are reshaped to their patch grid, class and
    register tokens dropped (:meth:`CamLayer.to_map`, pytorch-grad-cam's
    ``reshape_transform``), so every CAM formula reads a ViT as it reads a CNN.
    """
    model = require_model(ctx)
    if ctx.target_layer is None:
        raise UnsupportedMethodError("CAM methods need a target layer; this model has none")
    acts, grads = [], []
    for part in row_chunks(ctx, inputs.shape[0]):
        # The activations are a leaf of their own: the forward up to the layer builds no
        # graph (input and parameters do not require grad), and the backward runs only
        # through the layers after it (16% off Grad-CAM on the default model).
        with torch.enable_grad(), capture_activations(ctx.target_layer, leaf=True) as capture:
            selected = target_logits(model(inputs[part].detach()), targets[part])
            activation = capture.single()
            if not selected.requires_grad:
                raise UnsupportedMethodError("the logits do not depend on the target layer")
            (grad,) = torch.autograd.grad(selected.sum(), activation, allow_unused=True)
        if grad is None:
            raise UnsupportedMethodError("the logits do not depend on the target layer")
        if ctx.cam_layer is not None:
            activation, grad = ctx.cam_layer.to_map(activation), ctx.cam_layer.to_map(grad)
        if activation.dim() != 4:
            raise UnsupportedMethodError(
                f"target layer output must be (N, C, H, W), got {tuple(activation.shape)}"
            )
        # float32 whatever the layer computed in (autocast): the CAM sums run at full precision
        acts.append(activation.detach().float())
        grads.append(grad.detach().float())
    return torch.cat(acts), torch.cat(grads)


def _to_input_size(cam: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """ReLU, then bilinear upsampling ``(B, h, w) -> (B, H, W)`` as Captum's ``interpolate``."""
    return upsample(F.relu(cam), (inputs.shape[-2], inputs.shape[-1]))


@register_method(
    "grad_cam",
    backend="torch",
    needs_gradients=True,
    needs_layer=True,
    description=(
        "ReLU of layer activations weighted by spatially averaged gradients, upsampled "
        "(Selvaraju et al. 2017, Grad-CAM)"
    ),
    paper=SELVARAJU_2017,
    cost=one_gradient,
)
def grad_cam(ctx: ExplainContext, inputs: torch.Tensor, targets: torch.Tensor) -> Attribution:
    """Grad-CAM: ``ReLU(sum_k alpha_k A^k)`` with ``alpha_k = mean_ij d S_t / d A^k_ij``.

    Args:
        ctx: engine context (model, ``target_layer``).
        inputs: ``(B, C, H, W)`` pixels in ``[0, 1]``.
        targets: ``(B,)`` class to explain per item.

    Returns:
        Non-negative maps ``(B, H, W)``, bilinearly upsampled from the layer's resolution.

    Paper: https://arxiv.org/abs/1610.02391
    """
    acts, grads = layer_activations_and_gradients(ctx, inputs, targets)
    alpha = grads.mean(dim=(2, 3), keepdim=True)
    return Attribution(maps=_to_input_size((alpha * acts).sum(dim=1), inputs))


@register_method(
    "grad_cam_pp",
    backend="torch",
    needs_gradients=True,
    needs_layer=True,
    description=(
        "Grad-CAM with pixel-weighted gradients from higher-order terms "
        "(Chattopadhay et al. 2018, Grad-CAM++)"
    ),
    paper=CHATTOPADHAY_2018,
    cost=one_gradient,
)
def grad_cam_pp(ctx: ExplainContext, inputs: torch.Tensor, targets: torch.Tensor) -> Attribution:
    """Grad-CAM++: ``ReLU(sum_k w_k A^k)``, ``w_k = sum_ij a^k_ij ReLU(g^k_ij)``.

    Closed-form ``a^k_ij = g^2 / (2 g^2 + sum_ab A^k_ab g^3)`` (eq. 19) with ``g = dS_t/dA``:
    taking the score through ``exp`` makes the second and third derivatives powers of the
    first (eq. 17-18) for a piecewise-linear network, and ``exp(S)`` cancels. Same formula
    and ``1e-6`` stabiliser as pytorch-grad-cam; ``a = 0`` where ``g = 0``.

    Args:
        ctx: engine context (model, ``target_layer``).
        inputs: ``(B, C, H, W)`` pixels in ``[0, 1]``.
        targets: ``(B,)`` class to explain per item.

    Returns:
        Non-negative maps ``(B, H, W)``, bilinearly upsampled from the layer's resolution.

    Paper: https://arxiv.org/abs/1710.11063
    """
    acts, grads = layer_activations_and_gradients(ctx, inputs, targets)
    grads_2 = grads.pow(2)
    grads_3 = grads_2 * grads
    act_sum = acts.sum(dim=(2, 3), keepdim=True)
    aij = grads_2 / (2 * grads_2 + act_sum * grads_3 + GRADCAM_PP_EPS)
    aij = torch.where(grads != 0, aij, torch.zeros_like(aij))
    weights = (aij * F.relu(grads)).sum(dim=(2, 3), keepdim=True)
    return Attribution(maps=_to_input_size((weights * acts).sum(dim=1), inputs))
