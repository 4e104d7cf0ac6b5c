"""Every torch method, on every zoo backbone, explains class A on A's half and B on B's.

The model (:mod:`tests.engine.two_halves`) makes class 0's logit a function of the left
image half only and class 1's of the right half only, exactly, whatever the random weights.
The bounds below therefore hold by construction, for every method of the registry:

* **pixel-gradient methods** (vanilla gradient, gradient x input, SmoothGrad and its
  variants, Integrated Gradients): the other half's pixels have no path to the logit, so
  ``d logit / d pixel`` is exactly 0 there -- at the image and at every noisy or
  interpolated copy of it -- and each map is a pointwise function of such gradients that
  is 0 where they are 0 (``|g|``, ``g * x``, means, squares and variances of ``g``,
  ``(x - x0) * mean g``). All positive mass is on the class's own half: fraction 1.
* **CAM methods**: the class's channels of the CAM layer are exactly 0 on the other half of
  the grid and its head weights positive, so the map before upsampling is positive on its
  own half and 0 on the other. Bilinear upsampling spreads a cell over one cell's width
  each side; past the middle goes at most the tail of the boundary column's triangle,
  1/8 of its mass. At least 7/8 of the mass stays on the class's half (exactly 7/8 when
  the grid has one column per half, as the tiny CNNs' 2x2 map at 64 px).

Either way the maximum lies on the class's own half, and far more than half of the mass:
the bound the test states is the family's, with 1e-6 of room for summation order.
"""

from __future__ import annotations

import pytest
import torch

from service.engine.engine import Engine
from service.engine.registry import MethodSpec, iter_methods
from service.models.zoo import ZOO
from tests.engine.nets import cnn_methods
from tests.engine.two_halves import SIZE, half_scores, two_halves_engine

METHODS = cnn_methods(iter_methods("torch"))
CAM_BOUND = 7 / 8  # bilinear upsampling's leak across the middle, at most 1/8
GRADIENT_BOUND = 1.0  # no path from the other half: exactly zero there
ROOM = 1e-6  # summation order of the masses, nothing more


@pytest.fixture(scope="module", params=list(ZOO))
def engine(request: pytest.FixtureRequest) -> Engine:
    return two_halves_engine(request.param)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


def test_each_class_reads_only_its_half(engine: Engine, images: torch.Tensor) -> None:
    """The construction itself: changing one half moves only that half's class."""
    changed = images.clone()
    changed[..., SIZE // 2 :] = torch.rand(2, 3, SIZE, SIZE // 2)
    with torch.no_grad():
        before, after = engine.model(images), engine.model(changed)
    assert torch.equal(before[:, 0], after[:, 0])
    assert bool((before[:, 1] != after[:, 1]).all())


def test_cam_layer_is_the_side_by_side_map(engine: Engine) -> None:
    assert engine.target_layer_name == "model.halves"


@pytest.mark.parametrize("spec", METHODS, ids=[m.name for m in METHODS])
@pytest.mark.parametrize("target", [0, 1], ids=["left_class", "right_class"])
def test_map_is_on_the_half_its_class_reads(
    engine: Engine, images: torch.Tensor, spec: MethodSpec, target: int
) -> None:
    maps = engine.explain(images, [target, target], spec.name, seed=3).maps
    bound = CAM_BOUND if spec.needs_layer else GRADIENT_BOUND
    for score in half_scores(maps, target):
        assert score.own_max > score.other_max, score
        assert score.own_fraction >= bound - ROOM, score
