"""Integrated Gradients: quadrature rules, baselines, completeness error."""

from __future__ import annotations

import itertools

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from service.engine.engine import Engine
from service.engine.errors import InvalidInputError
from service.engine.methods.integrated_gradients import (
    INTEGRATIONS,
    gaussian_blur,
    make_baseline,
    quadrature,
)
from service.engine.registry import ParamValue
from service.engine.types import ExplainContext
from tests.engine.conftest import ModelCase
from tests.engine.nets import SIZE, TinyCnn, images


@pytest.mark.parametrize("integration", INTEGRATIONS)
def test_quadrature_weights_sum_to_one(integration: str) -> None:
    nodes, weights = quadrature(integration, 9)
    assert len(nodes) == len(weights) == 9
    assert weights.sum() == pytest.approx(1.0)
    assert ((nodes >= 0) & (nodes <= 1)).all()


def test_gauss_legendre_is_exact_for_polynomials() -> None:
    nodes, weights = quadrature("gauss_legendre", 4)  # exact up to degree 7
    assert float((weights * nodes**7).sum()) == pytest.approx(1 / 8, rel=1e-12)


def test_quadrature_rejects_bad_arguments() -> None:
    with pytest.raises(InvalidInputError, match="gauss_legendre"):
        quadrature("simpson", 8)
    with pytest.raises(InvalidInputError):
        quadrature("riemann_trapezoid", 1)


@pytest.fixture(scope="module")
def smooth_engine() -> Engine:
    # Smooth activations: the integrand is smooth, so quadrature error falls steadily.
    return Engine(TinyCnn(seed=5, act=nn.Softplus), input_shape=(3, SIZE, SIZE), chunk_size=64)


@pytest.mark.parametrize(
    ("integration", "baseline"),
    [
        ("gauss_legendre", "black"),
        ("gauss_legendre", "uniform"),
        ("riemann_middle", "black"),
        ("riemann_trapezoid", "black"),
    ],
)
def test_completeness_error_shrinks_with_steps(
    smooth_engine: Engine, integration: str, baseline: str
) -> None:
    x = images(2, seed=6)
    errors = []
    floor = 0.0
    for n_steps in (8, 32, 128):
        params: dict[str, ParamValue] = {
            "n_steps": n_steps,
            "integration": integration,
            "baseline": baseline,
        }
        result = smooth_engine.explain(x, [1, 2], "integrated_gradients", params)
        assert result.completeness_error is not None
        errors.append(float(result.completeness_error.mean()))
        # The error cannot go below float32 rounding of the sum it is measured on: a
        # few dozen ulps of |f(x) - f(x')| (the maps sum to it within the error itself).
        explained = float(result.maps.flatten(1).sum(dim=1).abs().mean())
        floor = max(floor, 32 * float(torch.finfo(torch.float32).eps) * explained)
    # Quadrature error shrinks with more nodes until it reaches that floor; once there,
    # further differences are rounding noise (Gauss-Legendre reaches it at 8 nodes on a
    # smooth integrand), so a strict decrease is only asserted above the floor.
    for coarse, fine in itertools.pairwise(errors):
        assert fine < coarse or fine <= floor, (errors, floor)
    assert errors[-1] <= max(floor, 0.5 * errors[0]), (errors, floor)
    # Relative to the logit difference being explained, the default-size error is small.
    params = {"integration": integration, "baseline": baseline}  # default n_steps
    result = smooth_engine.explain(x, [1, 2], "integrated_gradients", params)
    total = result.maps.flatten(1).sum(dim=1)
    assert result.completeness_error is not None
    assert (result.completeness_error <= 0.05 * total.abs() + 1e-4).all()


def test_completeness_costs_one_forward_of_the_ends(tiny_case: object) -> None:
    calls: list[tuple[int, bool]] = []
    model = TinyCnn()
    model.register_forward_pre_hook(
        lambda _m, args: calls.append((args[0].shape[0], torch.is_grad_enabled()))
    )
    engine = Engine(model, input_shape=(3, SIZE, SIZE), chunk_size=1000)
    calls.clear()
    engine.explain(images(2), [1, 2], "integrated_gradients", {"n_steps": 10})
    # the 10 nodes of 2 items with gradients, then x' and x of both items without autograd
    assert calls == [(2 * 10, True), (2 * 2, False)]
    calls.clear()
    params: dict[str, ParamValue] = {"n_steps": 10, "integration": "riemann_trapezoid"}
    engine.explain(images(2), [1, 2], "integrated_gradients", params)
    assert calls == [(2 * 10, True)]  # the trapezoid rule already holds both ends


class Affine(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3 * 8 * 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))


def test_trapezoid_is_exact_on_a_linear_model() -> None:
    model = Affine()
    engine = Engine(model, input_shape=(3, 8, 8))
    params: dict[str, ParamValue] = {"n_steps": 2, "integration": "riemann_trapezoid"}
    result = engine.explain(images(2, size=8), [0, 2], "integrated_gradients", params)
    assert result.completeness_error is not None
    assert float(result.completeness_error.max()) < 1e-5
    weights = model.linear.weight.detach()
    expected = (weights[[0, 2]].view(2, 3, 8, 8) * images(2, size=8)).sum(dim=1)
    torch.testing.assert_close(result.maps, expected)


def test_blurred_baseline_matches_opencv() -> None:
    x = images(1, seed=2, size=20)
    ours = gaussian_blur(x, 1.5)[0].permute(1, 2, 0).numpy()
    # 3-sigma radius: ceil(4.5) = 5, an 11-tap kernel.
    theirs = cv2.GaussianBlur(
        x[0].permute(1, 2, 0).numpy(), (11, 11), 1.5, borderType=cv2.BORDER_REFLECT_101
    )
    np.testing.assert_allclose(ours, theirs, atol=1e-6)


def test_uniform_baseline_comes_from_the_generator_and_is_shared() -> None:
    x = images(3)
    ctx = ExplainContext(model=None, generator=torch.Generator().manual_seed(4))
    ref = make_baseline(ctx, x, "uniform", 5.0)
    expected = torch.rand((1, *x.shape[1:]), generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(ref, expected.expand_as(x))
    with pytest.raises(InvalidInputError, match="black"):
        make_baseline(ctx, x, "gray", 5.0)


def test_uniform_baseline_depends_on_seed(tiny_engine: Engine) -> None:
    params: dict[str, ParamValue] = {"baseline": "uniform", "n_steps": 4}
    a = tiny_engine.explain(images(1), [1], "integrated_gradients", params, seed=1).maps
    b = tiny_engine.explain(images(1), [1], "integrated_gradients", params, seed=2).maps
    c = tiny_engine.explain(images(1), [1], "integrated_gradients", params, seed=1).maps
    assert not torch.allclose(a, b)
    torch.testing.assert_close(a, c, rtol=0, atol=0)


@pytest.mark.parametrize("integration", ["gauss_legendre", "riemann_trapezoid"])
def test_completeness_error_shrinks_on_the_default_model(
    default_case: ModelCase, integration: str
) -> None:
    """On a ReLU network the integrand has kinks, so the error is not monotone image by
    image once it is tiny; over a batch of the model's own kind of images it falls by a
    large factor and ends small next to the attribution it checks."""
    engine = Engine(default_case.model, input_shape=default_case.input_shape, chunk_size=64)
    from service.models import synthetic

    batch = synthetic.generate(2, seed=6, size=default_case.input_shape[-1])
    x = torch.from_numpy(batch.images).permute(0, 3, 1, 2).float() / 255.0
    errors, totals = [], []
    for n_steps in (8, 128):
        params: dict[str, ParamValue] = {"n_steps": n_steps, "integration": integration}
        result = engine.explain(x, None, "integrated_gradients", params)
        assert result.completeness_error is not None
        errors.append(float(result.completeness_error.mean()))
        totals.append(float(result.maps.flatten(1).sum(dim=1).abs().mean()))
    assert errors[1] < errors[0] / 4
    assert errors[1] < 0.02 * totals[1]
