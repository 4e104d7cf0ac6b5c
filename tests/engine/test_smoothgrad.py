"""SmoothGrad, SmoothGrad^2 and VarGrad against a float64 reference with the same noise."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from service.engine.engine import Engine
from service.engine.errors import InvalidInputError
from service.engine.methods.smoothgrad import noise_sigma
from tests.engine.nets import SIZE, TinyCnn, images

SMOOTH_METHODS = ("smoothgrad", "smoothgrad_sq", "vargrad")


def reference(
    model: nn.Module,
    x: torch.Tensor,
    targets: torch.Tensor,
    method: str,
    n_samples: int,
    noise_level: float,
    seed: int,
) -> torch.Tensor:
    """The documented convention, in float64, one item (all its samples) at a time.

    The noisy points themselves are formed in float32 as documented and only then widened:
    a ReLU network's gradient jumps where a unit switches, so points one ulp apart could
    differ by far more than the rounding this test is about.
    """
    model64 = copy.deepcopy(model).double()
    z = torch.randn((n_samples, *x.shape[1:]), generator=torch.Generator().manual_seed(seed))
    flat = x.flatten(1)
    sigma = noise_level * (flat.amax(dim=1) - flat.amin(dim=1))
    maps = []
    for b in range(x.shape[0]):
        noisy = (x[b] + sigma[b] * z).double().requires_grad_(True)  # (S, C, H, W)
        logits = model64(noisy)[:, targets[b]]  # samples are independent in eval mode
        g = torch.autograd.grad(logits.sum(), noisy)[0]
        if method == "smoothgrad":
            per_channel = g.mean(dim=0).abs()
        elif method == "smoothgrad_sq":
            per_channel = (g * g).mean(dim=0)
        else:
            per_channel = g.var(dim=0, unbiased=False)
        maps.append(per_channel.amax(dim=0))
    return torch.stack(maps)


@pytest.mark.parametrize("method", SMOOTH_METHODS)
def test_matches_float64_reference(method: str) -> None:
    # A smooth network: float32 and float64 gradients at one point then differ by rounding
    # only. On a ReLU network a unit within rounding of its kink could switch in one
    # precision and not the other; the ReLU case is compared with Captum in test_captum.py,
    # in float32 on both sides.
    engine = Engine(TinyCnn(act=nn.Softplus), input_shape=(3, SIZE, SIZE), chunk_size=7)
    x = images(2, seed=3)
    t = torch.tensor([1, 3])
    params = {"n_samples": 6, "noise_level": 0.2}
    ours = engine.explain(x, t, method, params, seed=11).maps
    ref = reference(engine.model, x, t, method, 6, 0.2, seed=11)
    scale = float(ref.abs().max())
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-6 * scale)


def test_sigma_is_a_fraction_of_each_images_range() -> None:
    x = torch.zeros((2, 3, 4, 4))
    x[0, 0, 0, 0] = 1.0  # range 1.0
    x[1] = 0.25
    x[1, 2, 3, 3] = 0.75  # range 0.5
    assert noise_sigma(x, 0.15).flatten().tolist() == pytest.approx([0.15, 0.075])


class HalfSquare(nn.Module):
    """Logit 1 = sum(x^2) / 2, so its input gradient is x itself and VarGrad = sigma^2."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = 0.5 * (x * x).flatten(1).sum(dim=1)
        return torch.stack([torch.zeros_like(half), half], dim=1)


def test_vargrad_measures_the_noise_variance() -> None:
    """End to end: the noise actually applied has sigma = noise_level * (max - min)."""
    engine = Engine(HalfSquare(), input_shape=(1, 32, 32))
    x = torch.full((1, 1, 32, 32), 0.3)
    x[0, 0, :16] = 0.7  # range 0.4 -> sigma = 0.1 * 0.4
    maps = engine.explain(x, [1], "vargrad", {"n_samples": 256, "noise_level": 0.1}).maps
    assert float(maps.mean()) == pytest.approx(0.04**2, rel=0.05)


@pytest.mark.parametrize("method", SMOOTH_METHODS)
def test_independent_of_chunk_size_and_batch(tiny_engine: Engine, method: str) -> None:
    x = images(3, seed=4)
    t = torch.tensor([2, 1, 4])
    params = {"n_samples": 5}
    whole = tiny_engine.explain(x, t, method, params, seed=2).maps
    other = Engine(tiny_engine.model, input_shape=(3, SIZE, SIZE), chunk_size=64)
    torch.testing.assert_close(other.explain(x, t, method, params, seed=2).maps, whole)
    alone = other.explain(x[2:], t[2:], method, params, seed=2).maps
    torch.testing.assert_close(alone[0], whole[2], rtol=1e-4, atol=1e-6 * float(whole.max()))


@pytest.mark.parametrize(("params"), [{"n_samples": 0}, {"noise_level": -0.1}])
def test_rejects_bad_parameters(tiny_engine: Engine, params: dict[str, float]) -> None:
    with pytest.raises(InvalidInputError):
        tiny_engine.explain(images(1), None, "smoothgrad", params)


def test_tiny_cnn_is_not_trivially_linear() -> None:
    # Guard for the reference test: noise must change the gradient, or any mean passes.
    model = TinyCnn(act=nn.Softplus)
    x = images(1, seed=3).requires_grad_(True)
    g0 = torch.autograd.grad(model(x)[0, 1], x)[0]
    x2 = (x.detach() + 0.1).requires_grad_(True)
    g1 = torch.autograd.grad(model(x2)[0, 1], x2)[0]
    assert not torch.allclose(g0, g1)
