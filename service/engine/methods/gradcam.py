"""Class activation maps from one layer: Grad-CAM and Grad-CAM++, on CNN maps and ViT tokens.

Activations are captured per call by a forward hook that only records the calling
thread's forwards (see :mod:`service.engine.layers`), and gradients are taken with
``torch.autograd.grad`` with respect to those activations, so concurrent calls on the same
layer neither see each other's tensors nor need a lock. The hook is removed on every path.

A token layer's activations and gradients are reshaped to their patch grid, class and
register tokens dropped (:meth:`service.engine.cam_layer.CamLayer.to_map`, what
pytorch-grad-cam's ``reshape_transform`` does by hand), so every CAM formula -- this
module's and any other method's that reads the layer through :func:`layer_pass` or
:func:`layer_activations` -- reads a ViT as it reads a CNN.

Both maps are ReLU'd at the layer's resolution, then upsampled bilinearly to the input
size (``align_corners=False``, as Captum's ``LayerAttribution.interpolate``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from service.engine.cam_layer import CamLayer
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


@dataclass(frozen=True)
class CamReader:
    """The CAM layer's module, and how its output becomes an ``(N, K, h, w)`` map."""

    module: torch.nn.Module
    layer: CamLayer | None  # None: the output is read as a spatial map

    def as_map(self, output: torch.Tensor) -> torch.Tensor:
        """The layer's output (or its gradient) as a map; tokens reshaped to their grid."""
        if self.layer is not None:
            output = self.layer.to_map(output)
        if output.dim() != 4:
            raise UnsupportedMethodError(
                f"target layer output must be (N, C, H, W), got {tuple(output.shape)}"
            )
        return output


def require_layer(ctx: ExplainContext) -> CamReader:
    """The CAM layer, or ``UnsupportedMethodError`` for a model without one."""
    if ctx.target_layer is None:
        raise UnsupportedMethodError("CAM methods need a target layer; this model has none")
    return CamReader(ctx.target_layer, ctx.cam_layer)


def layer_pass(
    model: torch.nn.Module, layer: CamReader, rows: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk's layer activations ``A`` and ``d S_t / d A``, each ``(N, K, h, w)`` float32."""
    # The activations are a leaf of their own: the forward up to the layer builds no
    # graph (input and parameters do not require grad), and the backward runs only
    # through the layers after it (16% off Grad-CAM on the default model).
    with torch.enable_grad(), capture_activations(layer.module, leaf=True) as capture:
        selected = target_logits(model(rows.detach()), targets)
        activation = capture.single()
        if not selected.requires_grad:
            raise UnsupportedMethodError("the logits do not depend on the target layer")
        (grad,) = torch.autograd.grad(selected.sum(), activation, allow_unused=True)
    if grad is None:
        raise UnsupportedMethodError("the logits do not depend on the target layer")
    activation, grad = layer.as_map(activation), layer.as_map(grad)
    # float32 whatever the layer computed in (autocast): the CAM sums run at full precision
    return activation.detach().float(), grad.detach().float()


def layer_activations(ctx: ExplainContext, inputs: torch.Tensor) -> torch.Tensor:
    """Target layer activations ``(B, K, h, w)`` float32, forwards only, in chunks."""
    model, layer = require_model(ctx), require_layer(ctx)
    acts = []
    for part in row_chunks(ctx, inputs.shape[0]):
        with torch.no_grad(), capture_activations(layer.module) as capture:
            model(inputs[part])
            acts.append(layer.as_map(capture.single()).float())
    return torch.cat(acts)


def layer_activations_and_gradients(
    ctx: ExplainContext, inputs: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Target layer activations ``A`` and ``d S_t / d A``, each ``(B, K, h, w)``, detached."""
    model, layer = require_model(ctx), require_layer(ctx)
    acts, grads = [], []
    for part in row_chunks(ctx, inputs.shape[0]):
        activation, grad = layer_pass(model, layer, inputs[part], targets[part])
        acts.append(activation)
        grads.append(grad)
    return torch.cat(acts), torch.cat(grads)


def grad_cam_pp_weights(
    acts: torch.Tensor, grads: torch.Tensor, grads_2: torch.Tensor, grads_3: torch.Tensor
) -> torch.Tensor:
    """Grad-CAM++ channel weights ``w_k = sum_ij a^k_ij ReLU(g^k_ij)``, shape ``(B, K, 1, 1)``.

    ``a^k_ij = g2 / (2 g2 + sum_ab A^k_ab g3 + 1e-6)`` (eq. 19), ``0`` where ``g2 = 0``. Plain
    Grad-CAM++ passes ``g, g^2, g^3`` of one gradient; Smooth Grad-CAM++ their averages
    over noisy copies.
    """
    act_sum = acts.sum(dim=(2, 3), keepdim=True)
    aij = grads_2 / (2 * grads_2 + act_sum * grads_3 + GRADCAM_PP_EPS)
    aij = torch.where(grads_2 != 0, aij, torch.zeros_like(aij))
    return (aij * F.relu(grads)).sum(dim=(2, 3), keepdim=True)


def to_input_size(cam: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
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
    return Attribution(maps=to_input_size((alpha * acts).sum(dim=1), inputs))


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
    weights = grad_cam_pp_weights(acts, grads, grads_2, grads_2 * grads)
    return Attribution(maps=to_input_size((weights * acts).sum(dim=1), inputs))
