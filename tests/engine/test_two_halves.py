"""Every method, on every zoo architecture, asked about class A then B of a two-halves model.

Two constructions (:mod:`tests.engine.two_halves`) make class 0's logit a function of the
image's left half only and class 1's of the right half only, exactly, whatever the random
weights: ``TwoHalves`` runs each half through any zoo backbone as its own batch item and
puts the feature maps side by side (every architecture); ``TwoHalvesViT`` runs a zoo ViT on
the whole image as one sequence with its attention masked per half (the two ViTs: the
attention methods need one sequence per image).

What a method must show there follows from its definition, and only that is asserted:

* **pixel-gradient methods** (vanilla gradient, gradient x input, SmoothGrad and its
  variants, Integrated Gradients): the other half's pixels have no path to the logit, so
  every gradient is exactly 0 there, and each map is a pointwise function of gradients
  that is 0 where they are: all positive mass on the class's half (fraction 1).
* **CAM methods on TwoHalves' side-by-side map**: the class's channels are exactly 0 on the
  other half of the grid, its head weights positive, so the map before upsampling is
  positive on its half and 0 on the other; bilinear upsampling leaks at most 1/8 of the
  boundary column's mass: fraction >= 7/8, maximum on the class's half.
* **CAM methods on a ViT's token map** (TwoHalvesViT): nothing. Grad-CAM weights every
  token's activations by channel weights from the gradients; the other half's tokens have
  no gradient but do have activations, so their cells get ``ReLU(alpha . A)`` like any
  other. Reported, not asserted.
* **gradient-weighted attention** (Chefer et al.): the other group's rows and columns of
  every layer's ``ReLU(grad * A)`` are exactly 0 (masked attention, no gradient), so the
  class's readout row of ``R`` is 0 over the other half's patches: fraction >= 7/8 after
  the same bilinear upsampling, maximum on the class's half.
* **attention rollout**: class-independent by definition (no target enters it): the maps
  for A and B are identical, and their mass is split between the halves.
* **occlusion**: a window wholly on the other half does not change the logit, so pixels at
  least one window from the middle (covered only by such windows) get exactly 0.
* **Sobol**: a cell of the other half has no effect, so its total index is exactly 0;
  bicubic upsampling reaches two cells, so beyond two cells from the middle the map is 0.
* **RISE**: nothing. A pixel's value is the mean score of the masks that keep it; for a
  pixel the class ignores that is the mean score of all masks, not 0. Reported.
* **LIME and KernelSHAP**: nothing. Their SLIC superpixels follow the image, not the
  middle, so one may straddle it; and a least-squares fit over random subsets gives a
  superpixel without effect a coefficient near 0, not 0 (with fewer samples than
  superpixels, whatever the minimum-norm solution makes of it). Reported.

A method without an entry here is held to what any faithful map should show: its maximum
and most of its positive mass on the class's half. "Exactly 0" is checked to rounding:
``1e-5`` of the map's maximum plus ``1e-6`` of the largest logit (a logit difference is
known to that much in float32).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from service.engine.engine import Engine
from service.engine.registry import METHODS, MethodSpec, ParamValue
from service.models.zoo import ZOO
from tests.engine.two_halves import (
    SIZE,
    half_scores,
    two_halves_engine,
    two_halves_vit_engine,
)

VITS = ["vit_s16", "vit_s16_sdpa_reg4"]
CAM_BOUND = 7 / 8  # bilinear upsampling's leak across the middle, at most 1/8
ROOM = 1e-6  # summation order of the masses, nothing more
COUNTS = 4  # samples, steps, masks, designs: the properties hold for any count


@dataclass(frozen=True)
class Expected:
    """What a method's definition implies on a two-halves model."""

    fraction: float | None = None  # positive mass on the class's half, at least
    max_on_own: bool = False
    zero_beyond: int | None = None  # px from the middle past which the other half is 0
    class_independent: bool = False


def params_of(spec: MethodSpec) -> dict[str, ParamValue]:
    """Cheap counts; window and grid sizes as their defaults (the bounds use them)."""
    return {
        p.name: max(int(p.minimum or 1), COUNTS)
        for p in spec.params
        if p.kind == "int" and p.name.startswith("n_")
    }


def expected(spec: MethodSpec, tokens: bool) -> Expected | None:
    """See the module docstring; ``tokens``: the CAM layer is a ViT's token map."""
    defaults = spec.defaults
    if spec.name == "attention_rollout":
        return Expected(class_independent=True)
    if spec.name == "gradient_weighted_attention" or (spec.needs_layer and not tokens):
        return Expected(fraction=CAM_BOUND, max_on_own=True)
    if spec.needs_layer or spec.name in ("rise", "lime", "kernel_shap"):
        return None
    if spec.name == "occlusion":
        return Expected(zero_beyond=int(defaults["window"]))
    if spec.name == "sobol":
        return Expected(zero_beyond=2 * SIZE // int(defaults["grid_size"]))
    if spec.needs_gradients:
        return Expected(fraction=1.0, max_on_own=True)
    return Expected(fraction=0.5, max_on_own=True)  # a new method: any faithful map


def images() -> torch.Tensor:
    return torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


def check(engine: Engine, spec: MethodSpec, tokens: bool) -> None:
    want = expected(spec, tokens)
    x, params = images(), params_of(spec)
    maps = [engine.explain(x, [t, t], spec.name, params, seed=3).maps for t in (0, 1)]
    assert all(bool(torch.isfinite(m).all()) for m in maps)
    if want is None:
        return
    if want.class_independent:
        assert torch.equal(maps[0], maps[1])
        return
    logit = float(engine.predict_logits(x).abs().max())
    middle = SIZE // 2
    for target, target_maps in enumerate(maps):
        for score in half_scores(target_maps, target):
            if want.fraction is not None:
                assert score.own_fraction >= want.fraction - ROOM, score
            if want.max_on_own:
                assert score.own_max > score.other_max, score
        if want.zero_beyond is not None:
            far = (
                slice(middle + want.zero_beyond, None)
                if target == 0
                else slice(None, middle - want.zero_beyond)
            )
            for item in target_maps:
                tolerance = 1e-5 * float(item.abs().max()) + 1e-6 * logit
                assert float(item[:, far].abs().max()) <= tolerance


@pytest.fixture(scope="module", params=list(ZOO))
def engine(request: pytest.FixtureRequest) -> Engine:
    return two_halves_engine(request.param)


@pytest.fixture(scope="module", params=VITS)
def vit_engine(request: pytest.FixtureRequest) -> Engine:
    return two_halves_vit_engine(request.param)


def reads_only_its_half(model: torch.nn.Module) -> None:
    """Changing one half moves only that half's class."""
    x = images()
    changed = x.clone()
    changed[..., SIZE // 2 :] = torch.rand(2, 3, SIZE, SIZE // 2)
    with torch.no_grad():
        before, after = model(x), model(changed)
    assert torch.equal(before[:, 0], after[:, 0])
    assert bool((before[:, 1] != after[:, 1]).all())


def test_two_halves_each_class_reads_only_its_half(engine: Engine) -> None:
    reads_only_its_half(engine.model)
    assert engine.target_layer_name == "model.halves"


def test_two_halves_gives_a_vit_no_attention_methods(engine: Engine) -> None:
    """Each image runs as two sequences: attention has no place on the image."""
    reason = engine.unavailable.get("attention", "")
    assert engine.attention is None
    assert "no attention layers" in reason or "split over several sequences" in reason


def test_masked_vit_each_class_reads_only_its_half(vit_engine: Engine) -> None:
    reads_only_its_half(vit_engine.model)
    assert vit_engine.cam_layer is not None and vit_engine.cam_layer.kind == "tokens"
    assert vit_engine.attention is not None


ON_BOTH = [s for s in METHODS.members() if not s.needs_attention]


@pytest.mark.parametrize("spec", ON_BOTH, ids=[s.name for s in ON_BOTH])
def test_two_halves_on_every_architecture(engine: Engine, spec: MethodSpec) -> None:
    check(engine, spec, tokens=False)


@pytest.mark.parametrize("spec", METHODS.members(), ids=METHODS.names())
def test_masked_vit_one_sequence_per_image(vit_engine: Engine, spec: MethodSpec) -> None:
    check(vit_engine, spec, tokens=True)
