"""Class model visualisers against closed forms, their cost contract, and the default
model's recognition of its own visualisations (the issue's bar)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from bench.visualize import BAR, visualize_class
from service.engine.types import ExplainContext
from service.engine.visualize import VISUALIZERS, VisualizeRun
from service.engine.visualize.maco import natural_magnitude

MEAN, STD = 0.5, 0.25
SHAPE = (3, 8, 8)


class LinearScores(nn.Module):
    """``S(pixels) = W z`` with ``z = (pixels - 0.5) / 0.25``: the optimum of
    ``S_c(z) - l2 ||z||^2`` is ``z* = W_c / (2 l2)`` in closed form."""

    def __init__(self, weights: torch.Tensor) -> None:
        super().__init__()
        self.weights = weights

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return ((pixels - MEAN) / STD).flatten(1) @ self.weights.T


def run_for(model: nn.Module, target: int, seed: int = 0) -> VisualizeRun:
    ctx = ExplainContext(model=model, generator=torch.Generator().manual_seed(seed))
    return VisualizeRun(ctx, target, SHAPE, (MEAN,) * 3, (STD,) * 3)


def test_gradient_ascent_reaches_the_closed_form_optimum_of_a_linear_score() -> None:
    weights = 0.02 * torch.randn((2, math.prod(SHAPE)), generator=torch.Generator().manual_seed(1))
    l2 = 0.05
    optimum = (weights[1] / (2 * l2)).view(SHAPE)  # |z*| < 0.5: the [0, 1] clip is far
    spec = VISUALIZERS.get("gradient_ascent")
    params = spec.resolve_params({"steps": 400, "learning_rate": 0.005, "l2": l2})
    result = spec.fn(run_for(LinearScores(weights), 1), **params)
    reached = (result.image - MEAN) / STD
    # Normalised steps end within about one step length (0.005 RMS) of the optimum.
    assert torch.linalg.norm(reached - optimum) / torch.linalg.norm(optimum) < 0.1
    assert result.transparency is None


def test_maco_changes_only_the_phase_its_magnitude_stays_the_natural_spectrum() -> None:
    weights = torch.randn((2, math.prod(SHAPE)), generator=torch.Generator().manual_seed(2))
    spec = VISUALIZERS.get("maco")
    params = spec.resolve_params({"steps": 5, "crops": 2, "alpha": 1.5})
    result = spec.fn(run_for(LinearScores(weights), 0), **params)
    image = result.image.double()
    before_sigmoid = torch.log(image / (1 - image))
    magnitude = torch.fft.rfft2(before_sigmoid).abs()
    expected = natural_magnitude(SHAPE[1], SHAPE[2], 1.5).double().expand_as(magnitude)
    # Columns 0 and W/2 of an rfft2 hold self-conjugate pairs: irfft2 symmetrises their
    # free phases, so their magnitude is not kept (the DC term is standardised away too).
    # Every other coefficient keeps its magnitude up to one scale, the standardisation's.
    ratio = (magnitude / expected)[:, :, 1 : SHAPE[2] // 2].flatten()
    assert float(ratio.std() / ratio.mean()) < 1e-3
    assert result.transparency is not None and result.transparency.shape == SHAPE[1:]
    assert float(result.transparency.min()) >= 0 and float(result.transparency.max()) > 0


@pytest.mark.parametrize("name", VISUALIZERS.names())
def test_the_stated_cost_counts_every_gradient_row(name: str) -> None:
    """Rows through the model = the cost's gradient rows, plus one final forward."""
    model = LinearScores(torch.randn((2, math.prod(SHAPE))))
    rows = []
    handle = model.register_forward_hook(lambda _m, inputs, _o: rows.append(len(inputs[0])))
    spec = VISUALIZERS.get(name)
    params = spec.resolve_params({"steps": 7})
    try:
        spec.fn(run_for(model, 0), **params)
    finally:
        handle.remove()
    assert sum(rows) == spec.cost(params, SHAPE).backward_rows + 1


@pytest.fixture(scope="module")
def default_model() -> tuple[nn.Module, dict[str, object]]:
    from service.models.default import load_default_model

    return load_default_model()


def test_the_default_model_recognises_the_maco_image_of_every_class(
    default_model: tuple[nn.Module, dict[str, object]],
) -> None:
    """The issue's bar, seeded so deterministic: p >= 0.9 for every class. The margin is
    wide (bench/results/class_visualisation.md: the lowest is 0.999 over seeds 0-2), so
    float rounding on another machine does not decide it."""
    model, meta = default_model
    labels = meta["labels"]
    assert isinstance(labels, list)
    found = {label: visualize_class(model, meta, "maco", c, 0) for c, label in enumerate(labels)}
    below = {label: round(r.probability, 3) for label, r in found.items() if r.probability < BAR}
    assert not below, f"MACO images the model does not recognise: {below}"


def test_the_default_model_recognises_most_gradient_ascent_images(
    default_model: tuple[nn.Module, dict[str, object]],
) -> None:
    model, meta = default_model
    labels = meta["labels"]
    assert isinstance(labels, list)
    found = [visualize_class(model, meta, "gradient_ascent", c, 0) for c in range(len(labels))]
    recognised = [c for c, r in enumerate(found) if r.top == c]
    assert len(recognised) > len(labels) // 2, recognised
