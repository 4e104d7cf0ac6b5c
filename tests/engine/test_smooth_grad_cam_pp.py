"""Smooth Grad-CAM++ against a float64 reference written from the paper's equations.

The reference below shares no code with the method: it draws the same noise (the
documented SmoothGrad convention), hooks the layer itself, and spells out Omeiza et al.
2019, sec. 3 with the numerator of Grad-CAM++ (see the module docstring for why):
``D_p = mean_s (dS/dA)^p`` over noisy copies, ``A`` of the clean image,
``a = D2 / (2 D2 + sum A * D3 + 1e-6)``, ``w = sum a ReLU(D1)``, map ``ReLU(sum w A)``.

The layer is the tiny CNN's *middle* block: after the last block come only a global
average pool and a linear head, so ``dS/dA`` there is a constant that no noise moves, and
a test on that layer could not tell Smooth Grad-CAM++ from Grad-CAM++.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from service.engine.engine import Engine
from tests.engine.nets import SIZE, TinyCnn, images

LAYER = "features.1"
STABILISER = 1e-6  # the docstring's constant in the alpha denominator


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(TinyCnn(seed=2), target_layer=LAYER, input_shape=(3, SIZE, SIZE), chunk_size=5)


def layer_and_gradient(
    model: nn.Module, layer: nn.Module, x: torch.Tensor, target: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``A`` and ``dS_target/dA`` of one image ``(1, C, H, W)``, at the model's dtype."""
    x = x.detach().requires_grad_(True)  # the engine froze the parameters: grad flows from x
    seen: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda _m, _i, out: seen.append(out))
    try:
        score = model(x)[0, target]
    finally:
        handle.remove()
    (grad,) = torch.autograd.grad(score, seen[0])
    return seen[0].detach()[0], grad[0]


def reference(
    model: nn.Module,
    x: torch.Tensor,
    targets: list[int],
    n_samples: int,
    noise_level: float,
    seed: int,
) -> torch.Tensor:
    model64 = copy.deepcopy(model).double()
    layer = dict(model64.named_modules())[LAYER]
    # The documented draw: the request's generator, its first draw, shared by the batch.
    z = torch.randn((n_samples, *x.shape[1:]), generator=torch.Generator().manual_seed(seed))
    maps = []
    for b, target in enumerate(targets):
        sigma = noise_level * (x[b].max() - x[b].min())
        activations, _ = layer_and_gradient(model64, layer, x[b : b + 1].double(), target)
        d1 = d2 = d3 = torch.zeros_like(activations)
        for s in range(n_samples):
            # Noisy points formed in float32 as documented, then widened: a ReLU network's
            # gradient jumps where a unit switches, which is not what this test is about.
            noisy = (x[b] + sigma * z[s]).double()[None]
            _, g = layer_and_gradient(model64, layer, noisy, target)
            d1, d2, d3 = d1 + g / n_samples, d2 + g**2 / n_samples, d3 + g**3 / n_samples
        act_sum = activations.sum(dim=(1, 2), keepdim=True)
        alpha = d2 / (2 * d2 + act_sum * d3 + STABILISER)
        alpha = torch.where(d2 > 0, alpha, torch.zeros_like(alpha))
        weights = (alpha * d1.clamp_min(0)).sum(dim=(1, 2), keepdim=True)
        cam = (weights * activations).sum(dim=0).clamp_min(0)
        maps.append(F.interpolate(cam[None, None], size=x.shape[-2:], mode="bilinear")[0, 0])
    return torch.stack(maps)


def test_matches_the_papers_equations_in_float64(engine: Engine) -> None:
    x = images(3, seed=6)
    targets = [1, 3, 2]
    params = {"n_samples": 7, "noise_level": 0.25}
    ours = engine.explain(x, targets, "smooth_grad_cam_pp", params, seed=13).maps
    expected = reference(engine.model, x, targets, 7, 0.25, seed=13)
    scale = float(expected.abs().max())
    assert scale > 0
    torch.testing.assert_close(ours.double(), expected, rtol=1e-4, atol=1e-5 * scale)


def test_noise_moves_the_map_on_this_layer(engine: Engine) -> None:
    """Guard for the reference test: here the noise matters, so averaging is exercised."""
    x = images(2, seed=6)
    smooth = engine.explain(x, [1, 3], "smooth_grad_cam_pp", seed=13).maps
    plain = engine.explain(x, [1, 3], "grad_cam_pp").maps
    assert float((smooth - plain).abs().max()) > 0.05 * float(plain.abs().max())


def test_without_noise_it_is_grad_cam_pp(engine: Engine) -> None:
    """At noise level 0 every copy is the image: the averages are Grad-CAM++'s own terms."""
    x = images(2, seed=8)
    smooth = engine.explain(x, [4, 2], "smooth_grad_cam_pp", {"noise_level": 0.0, "n_samples": 3})
    plain = engine.explain(x, [4, 2], "grad_cam_pp").maps
    torch.testing.assert_close(smooth.maps, plain, rtol=1e-4, atol=1e-5 * float(plain.max()))
