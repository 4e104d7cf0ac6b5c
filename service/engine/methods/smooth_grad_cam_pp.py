"""Smooth Grad-CAM++ (Omeiza et al. 2019): Grad-CAM++ over noise-averaged derivatives.

What is averaged, and what is not (the paper's sec. 3, with the CAM and SmoothGrad
conventions of this package):

* Noisy copies are SmoothGrad's: ``x + sigma z_s`` with ``sigma = noise_level * (max(x) -
  min(x))`` per image and ``z = randn((n_samples, C, H, W))`` the first draw of the request's
  generator, shared by every item of a batch (see `smoothgrad`).
* Per copy, the gradient ``g_s = d S_t / d A`` at the target layer; through the ``exp``
  trick of Grad-CAM++ the 2nd and 3rd derivatives are ``g_s^2`` and ``g_s^3``. The three
  derivative terms are averaged over copies, each on its own, in float64:
  ``D1 = mean_s g_s``, ``D2 = mean_s g_s^2``, ``D3 = mean_s g_s^3``.
* The activations ``A`` are those of the clean image: the noise only smooths the
  derivatives. Then Grad-CAM++'s closed form with the averaged terms:
  ``a^k_ij = D2 / (2 D2 + sum_ab A^k_ab D3 + 1e-6)`` (``0`` where ``D2 = 0``),
  ``w_k = sum_ij a^k_ij ReLU(D1^k_ij)``, map ``ReLU(sum_k w_k A^k)``, upsampled bilinearly.
* Numerator ``D2``, as Grad-CAM++'s eq. 19 whose derivation the paper reuses; torch-cam
  notes that the paper prints ``D1`` there and uses ``D2`` too. With ``D2`` the method is
  Grad-CAM++ at ``noise_level = 0`` (every copy is the clean image), which a test checks.
  Reimplementations differ on what is averaged (some average whole normalised maps, or
  take the last copy's gradient in the ReLU); this one averages the derivative terms
  only, as the paper's equations do.
* Where only global average pooling and a linear head follow the layer (the default
  model's CAM layer, ResNets' last block), ``dS/dA`` is the same at every input: the noise
  changes nothing and the map is Grad-CAM++'s exactly (``bench/results/quality.md`` shows
  the two rows equal). It differs on layers with nonlinear layers after them.
"""

from __future__ import annotations

import math

import torch

from service.engine.methods.gradcam import (
    grad_cam_pp_weights,
    layer_activations,
    layer_pass,
    require_layer,
    to_input_size,
)
from service.engine.methods.gradient import require_model
from service.engine.methods.smoothgrad import PARAMS, noisy_rows
from service.engine.registry import InputShape, ResolvedParams, register_method
from service.engine.types import Attribution, ExplainContext
from service.protocol.cost import Cost

OMEIZA_2019 = "https://arxiv.org/abs/1908.01224"


def cost(params: ResolvedParams, input_shape: InputShape) -> Cost:
    """A forward for the clean activations, a gradient row per noisy copy; the noise ``z``
    (float32, drawn up front) is input-sized per copy. The layer's accumulators are
    activation-sized, like the model's own activations, which the budget leaves out."""
    n_samples = int(params["n_samples"])
    return Cost(
        forwards=1, backward_rows=n_samples, memory_bytes=4 * n_samples * math.prod(input_shape)
    )


@register_method(
    "smooth_grad_cam_pp",
    backend="torch",
    needs_gradients=True,
    needs_layer=True,
    params=PARAMS,
    description=(
        "Grad-CAM++ with its derivative terms averaged over noisy copies of the input "
        "(Omeiza et al. 2019, Smooth Grad-CAM++)"
    ),
    paper=OMEIZA_2019,
    cost=cost,
)
def smooth_grad_cam_pp(
    ctx: ExplainContext,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    n_samples: int,
    noise_level: float,
) -> Attribution:
    """Smooth Grad-CAM++: Grad-CAM++ weights from derivatives averaged over noisy copies.

    Args:
        ctx: engine context (model, ``target_layer``, generator, chunk size).
        inputs: ``(B, C, H, W)`` pixels in ``[0, 1]``.
        targets: ``(B,)`` class to explain per item.
        n_samples, noise_level: as SmoothGrad's (see ``smoothgrad.PARAMS``).

    Returns:
        Non-negative maps ``(B, H, W)``, bilinearly upsampled from the layer's resolution.
        Costs ``B`` forwards (clean activations) and ``B * n_samples`` forward-backward rows.

    Paper: https://arxiv.org/abs/1908.01224
    """
    model, layer = require_model(ctx), require_layer(ctx)
    acts = layer_activations(ctx, inputs).to(torch.float64)
    moments = torch.zeros((3, *acts.shape), dtype=torch.float64, device=acts.device)
    for noisy, item in noisy_rows(ctx, inputs, n_samples, noise_level):
        _, grads = layer_pass(model, layer, noisy, targets[item])
        grads = grads.to(torch.float64)
        grads_2 = grads * grads
        for k, power in enumerate((grads, grads_2, grads_2 * grads)):
            moments[k].index_add_(0, item.to(acts.device), power)
    d1, d2, d3 = moments / n_samples
    weights = grad_cam_pp_weights(acts, d1, d2, d3)
    cam = (weights * acts).sum(dim=1).to(torch.float32)
    return Attribution(maps=to_input_size(cam, inputs))
