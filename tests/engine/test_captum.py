"""The gradient methods against Captum 0.9 on the same model, inputs and targets.

Agreement is asked to ``rtol=1e-5`` plus an ``atol`` of ``1e-6`` of the reference's largest
magnitude (float32 sums in a different order cannot agree better on near-zero pixels),
unless a test states a bound of its own.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from captum.attr import (
    InputXGradient,
    IntegratedGradients,
    LayerAttribution,
    LayerGradCam,
    NoiseTunnel,
    Saliency,
)

from service.engine.engine import Engine
from service.engine.layers import resolve_layer
from service.engine.registry import ParamValue
from tests.engine.conftest import ModelCase
from tests.engine.nets import SIZE, TinyCnn, images

pytestmark = pytest.mark.filterwarnings("ignore:Input Tensor 0 did not already require gradients")


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    expected = expected.detach()
    atol = 1e-6 * float(expected.abs().max())
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=atol)


@pytest.fixture(scope="module")
def case(reference_case: ModelCase) -> tuple[Engine, torch.Tensor, torch.Tensor]:
    model = reference_case.model
    engine = Engine(
        model,
        target_layer=reference_case.target_layer,
        input_shape=reference_case.input_shape,
        chunk_size=16,
    )
    _, height, width = reference_case.input_shape
    x = images(3, seed=1, size=height)
    assert width == height
    logits = engine.predict_logits(x)
    # Explain the predicted class of item 0 and runner-up classes of the others.
    targets = torch.stack([logits[0].argmax(), logits[1].argsort()[-2], logits[2].argsort()[0]])
    return engine, x, targets


def test_vanilla_gradient(case: tuple[Engine, torch.Tensor, torch.Tensor]) -> None:
    engine, x, t = case
    ours = engine.explain(x, t, "vanilla_gradient").maps
    theirs = Saliency(engine.model).attribute(x, target=t, abs=True).amax(dim=1)
    assert_close(ours, theirs)


def test_gradient_x_input(case: tuple[Engine, torch.Tensor, torch.Tensor]) -> None:
    engine, x, t = case
    ours = engine.explain(x, t, "gradient_x_input").maps
    theirs = InputXGradient(engine.model).attribute(x, target=t).sum(dim=1)
    assert_close(ours, theirs)


def blur_float64(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur written here from its definition, in float64 NumPy, then float32.

    The documented convention of the blurred baseline: a kernel truncated at
    ``ceil(3 sigma)`` pixels, normalised to sum 1, applied per channel along rows then
    columns, with borders mirrored without repeating the edge pixel (reflect-101).
    """
    array = images.double().numpy()
    radius = math.ceil(3.0 * sigma)
    offsets = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    kernel /= kernel.sum()
    for axis in (3, 2):
        pad = [(0, 0)] * 4
        pad[axis] = (radius, radius)
        padded = np.pad(array, pad, mode="reflect")  # NumPy's "reflect" is reflect-101
        length = array.shape[axis]
        array = sum(
            weight * np.take(padded, np.arange(i, i + length), axis=axis)
            for i, weight in enumerate(kernel)
        )
    return torch.from_numpy(array).float()


def captum_ig(
    model: torch.nn.Module,
    x: torch.Tensor,
    baseline: torch.Tensor,
    targets: torch.Tensor,
    captum_method: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Captum's channel-summed attributions and convergence delta, 12 steps."""
    attr, delta = IntegratedGradients(model).attribute(
        x,
        baselines=baseline,
        target=targets,
        n_steps=12,
        method=captum_method,
        return_convergence_delta=True,
    )
    return attr.sum(dim=1), delta


# Captum's trapezoid weights are 1/n (summing to (n-1)/n); ours are 1/(n-1).
TRAPEZOID_SCALE = 12 / 11


@pytest.mark.parametrize(
    ("integration", "captum_method", "scale"),
    [
        ("gauss_legendre", "gausslegendre", 1.0),
        ("riemann_middle", "riemann_middle", 1.0),
        ("riemann_left", "riemann_left", 1.0),
        ("riemann_trapezoid", "riemann_trapezoid", TRAPEZOID_SCALE),
    ],
)
def test_integrated_gradients(
    case: tuple[Engine, torch.Tensor, torch.Tensor],
    integration: str,
    captum_method: str,
    scale: float,
) -> None:
    engine, x, t = case
    params: dict[str, ParamValue] = {"integration": integration, "n_steps": 12}
    ours = engine.explain(x, t, "integrated_gradients", params)
    attr, delta = captum_ig(engine.model, x, torch.zeros_like(x), t, captum_method)
    assert_close(ours.maps, scale * attr)
    if scale == 1.0:  # same quadrature: the same completeness error as Captum's delta
        assert ours.completeness_error is not None
        torch.testing.assert_close(
            ours.completeness_error, delta.abs().float(), rtol=1e-3, atol=1e-5
        )


@pytest.mark.parametrize(
    ("integration", "captum_method", "scale"),
    [
        ("gauss_legendre", "gausslegendre", 1.0),
        ("riemann_trapezoid", "riemann_trapezoid", TRAPEZOID_SCALE),
    ],
)
def test_integrated_gradients_from_a_blurred_baseline(
    integration: str, captum_method: str, scale: float
) -> None:
    """Captum gets the blurred baseline made in float64 here, not by the engine's blur.

    The two baselines differ by float32 rounding; on a ReLU network a path point that
    moves by an ulp may cross a kink, so this runs on a smooth (Softplus) network, where
    such a shift moves the attributions by about as little.
    """
    model = TinyCnn(seed=5, act=torch.nn.Softplus)
    engine = Engine(model, input_shape=(3, SIZE, SIZE), chunk_size=16)
    x, t = images(3, seed=1), torch.tensor([1, 2, 4])
    params: dict[str, ParamValue] = {
        "integration": integration,
        "n_steps": 12,
        "baseline": "blurred",
        "blur_sigma": 3.0,
    }
    ours = engine.explain(x, t, "integrated_gradients", params)
    baseline = blur_float64(x, 3.0)
    assert float((baseline - x).abs().max()) > 0.1  # the blur changed the image
    attr, delta = captum_ig(model, x, baseline, t, captum_method)
    assert_close(ours.maps, scale * attr)
    if scale == 1.0:
        assert ours.completeness_error is not None
        torch.testing.assert_close(
            ours.completeness_error, delta.abs().float(), rtol=1e-3, atol=1e-5
        )


def test_grad_cam(case: tuple[Engine, torch.Tensor, torch.Tensor]) -> None:
    engine, x, t = case
    ours = engine.explain(x, t, "grad_cam").maps
    assert engine.target_layer_name is not None
    layer = resolve_layer(engine.model, engine.target_layer_name)
    cam = LayerGradCam(engine.model, layer).attribute(x, target=t, relu_attributions=True)
    theirs = LayerAttribution.interpolate(cam, tuple(x.shape[-2:]), interpolate_mode="bilinear")
    assert_close(ours, theirs[:, 0])


def noise_tunnel(
    model: torch.nn.Module,
    x: torch.Tensor,
    target: int,
    nt_type: str,
    sigma: float,
    draws: torch.Tensor,
) -> torch.Tensor:
    """Captum's ``NoiseTunnel(Saliency)`` on one image, fed the given standard normal draws.

    Captum draws its noise as ``torch.normal(0, std)`` with ``std`` filled with ``sigma``
    and shaped ``(n_samples, C, H, W)`` for one image; this returns ``std * draws`` instead,
    so both sides see the same noisy points. Raw gradients (``abs=False``): SmoothGrad
    averages signed gradients. Per channel, ``(1, C, H, W)``.
    """

    def same_draws(mean: float, std: torch.Tensor) -> torch.Tensor:
        assert mean == 0 and std.shape == draws.shape
        return std * draws

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "normal", same_draws)
        return NoiseTunnel(Saliency(model)).attribute(
            x, nt_type=nt_type, nt_samples=len(draws), stdevs=sigma, target=target, abs=False
        )


@pytest.mark.parametrize("method", ["smoothgrad", "smoothgrad_sq", "vargrad"])
def test_smoothing_methods_equal_noise_tunnel_on_the_same_noise(
    case: tuple[Engine, torch.Tensor, torch.Tensor], method: str
) -> None:
    """SmoothGrad, SmoothGrad^2 and VarGrad are Captum's three ``nt_type`` on Saliency.

    Conventions applied to Captum's output, not to ours: our sigma is a fraction of each
    image's range (Smilkov et al.), Captum's absolute, so each image gets its own absolute
    sigma; the draws are the engine's documented ``randn((n_samples, C, H, W))`` from the
    request seed; our maps take the channel max (of ``|mean|`` for SmoothGrad).
    """
    engine, x, t = case
    n_samples, noise_level, seed = 8, 0.2, 5
    # One image's samples in one pass, as Captum batches them: the same rows, so the same
    # gradients; what remains is Captum's float32 sums against our float64 ones.
    one_pass = Engine(engine.model, input_shape=engine.input_shape, chunk_size=n_samples)
    params: dict[str, ParamValue] = {"n_samples": n_samples, "noise_level": noise_level}
    eps = float(torch.finfo(torch.float32).eps)
    for b in (0, 2):
        image, target = x[b : b + 1], int(t[b])
        ours = one_pass.explain(image, [target], method, params, seed=seed).maps
        draws = torch.randn(
            (n_samples, *image.shape[1:]), generator=torch.Generator().manual_seed(seed)
        )
        sigma = float(noise_level * (image.amax() - image.amin()))
        mean_sq = noise_tunnel(engine.model, image, target, "smoothgrad_sq", sigma, draws)
        if method == "smoothgrad":
            theirs = noise_tunnel(engine.model, image, target, "smoothgrad", sigma, draws)
            theirs = theirs.abs().amax(dim=1)
            scale = float(mean_sq.max()) ** 0.5  # bounds mean |g|
        elif method == "smoothgrad_sq":
            theirs, scale = mean_sq.amax(dim=1), float(mean_sq.max())
        else:  # Captum's E[g^2] - E[g]^2 in float32 may dip below 0; ours is clamped at 0
            theirs = noise_tunnel(engine.model, image, target, "vargrad", sigma, draws)
            theirs, scale = theirs.amax(dim=1).clamp_min(0), 2 * float(mean_sq.max())
        # A float32 sum of n terms is off by at most ~n eps of the sum of their magnitudes.
        torch.testing.assert_close(ours, theirs, rtol=0, atol=4 * n_samples * eps * scale)
        # The noise matters at this sigma: other draws give another map.
        other = one_pass.explain(image, [target], method, params, seed=seed + 1).maps
        assert float((other - ours).abs().max()) > 100 * 4 * n_samples * eps * scale
