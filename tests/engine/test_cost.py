"""The cost model: what each method states against what it really evaluates and allocates.

The counts of every registered member are checked in ``test_contract.py`` (calls counted
at the model). Here: each quadrature rule of Integrated Gradients, the memory of the
buffers that grow with the parameters, measured with ``tracemalloc`` (numpy reports its
allocations to it), and the budget every default and every reasonable exhaustive setting
fits at 224 px while the hostile ones do not.
"""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import torch

from service.engine.methods.integrated_gradients import INTEGRATIONS, integrated_gradients
from service.engine.methods.rise import RiseMasks
from service.engine.methods.sobol import sobol_design
from service.engine.registry import METHODS, SCORES, Member
from service.engine.scores import compute_scores
from service.engine.types import ExplainContext
from service.protocol.cost import Cost, Item, check_budget
from service.protocol.errors import ResourceLimitError
from service.protocol.limits import Limits
from tests.engine.nets import SIZE, TinyCnn, images
from tests.engine.test_contract import CountingModel

SHAPE_224 = (3, 224, 224)


@pytest.mark.parametrize("integration", INTEGRATIONS)
def test_integrated_gradients_costs_a_forward_per_end_its_rule_misses(integration: str) -> None:
    forwards: list[int] = []
    gradient_rows: list[int] = []
    ctx = ExplainContext(model=CountingModel(TinyCnn(), forwards, gradient_rows), chunk_size=5)
    spec = METHODS.get("integrated_gradients")
    params = spec.resolve_params({"integration": integration, "n_steps": 7})
    integrated_gradients(ctx, images(3), torch.tensor([1, 2, 3]), **params)
    cost = spec.cost(params, (3, SIZE, SIZE))
    assert (sum(forwards), sum(gradient_rows)) == (3 * cost.forwards, 3 * cost.backward_rows)
    assert cost.forwards == {"riemann_trapezoid": 0, "riemann_left": 1, "riemann_right": 1}.get(
        integration, 2
    )


@pytest.fixture
def traced() -> Iterator[Callable[[], int]]:
    """The peak of traced (numpy and Python) allocations since the fixture started."""
    tracemalloc.start()
    try:
        yield lambda: tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def assert_memory_stated(measured: int, stated: int, in_flight: int = 0) -> None:
    """Never more than stated, besides the chunks in flight (``chunk_size`` bounds them, not
    the parameters); not so loose that the statement says nothing."""
    assert stated / 2 <= measured <= stated + in_flight, (measured, stated, in_flight)


def test_the_sobol_design_holds_what_its_cost_says(traced: Callable[[], int]) -> None:
    spec = METHODS.get("sobol")
    params = spec.resolve_params({"grid_size": 12, "n_designs": 256}, SHAPE_224)
    design = sobol_design(144, 256, seed=1)
    measured = traced()
    assert design.shape == (256 * 146, 144)
    assert_memory_stated(measured, spec.cost(params, SHAPE_224).memory_bytes)


def test_the_rise_masks_hold_what_the_cost_says(traced: Callable[[], int]) -> None:
    spec = METHODS.get("rise")
    params = spec.resolve_params({"grid_size": 32, "n_masks": 4096}, SHAPE_224)
    masks = RiseMasks(4096, 32, 0.5, SHAPE_224[1:], torch.Generator().manual_seed(0))
    measured = traced()
    assert masks.grid.shape == (4096, 32, 32)
    # The float32 draw and its boolean (torch) are not traced: 5 of the 9 bytes a cell.
    untraced = 4096 * 32 * 32 * 5
    assert_memory_stated(measured + untraced, spec.cost(params, SHAPE_224).memory_bytes)


def test_mu_fidelity_holds_what_its_cost_says(traced: Callable[[], int]) -> None:
    spec = SCORES.get("mu_fidelity")
    shape = (3, 96, 96)
    image = np.random.default_rng(0).random((1, *shape), dtype=np.float32)
    saliency = np.random.default_rng(1).random((1, *shape[1:]))

    def forward(x: np.ndarray) -> np.ndarray:
        return np.zeros((len(x), 2), dtype=np.float32)

    tracemalloc.reset_peak()
    compute_scores(forward, image, saliency, np.zeros(1), ["mu_fidelity"], chunk_size=8)
    measured = traced()
    # Two chunk buffers, the chunk being built, and its mask: 8 images of 4 bytes a value.
    in_flight = 4 * 8 * 4 * int(np.prod(shape))
    assert_memory_stated(measured, spec.cost(spec.defaults, shape).memory_bytes, in_flight)


@pytest.mark.parametrize("spec", [*METHODS.members(), *SCORES.members()], ids=lambda s: s.name)
def test_every_default_fits_the_default_budget_at_224_px(spec: Member) -> None:
    cost: Cost = spec.cost(spec.defaults, SHAPE_224)  # type: ignore[attr-defined]
    check_budget([Item(spec.name, cost, count=5)], Limits())  # five targets, say


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("rise", {"n_masks": 8192}),  # Petsiuk et al. use 4,000 to 8,000
        ("occlusion", {"window": 16, "stride": 1}),  # every window position
        ("sobol", {"grid_size": 11, "n_designs": 512}),  # Fel et al.'s grid, 16 x their designs
        ("smoothgrad", {"n_samples": 512}),  # ten times Smilkov et al.'s 50
        ("integrated_gradients", {"n_steps": 1024}),
    ],
)
def test_exhaustive_settings_people_use_fit_the_budget(method: str, params: dict) -> None:  # type: ignore[type-arg]
    spec = METHODS.get(method)
    resolved = spec.resolve_params(params, SHAPE_224)
    check_budget([Item(method, spec.cost(resolved, SHAPE_224))], Limits())


@pytest.mark.parametrize(
    ("member", "params", "message"),
    [
        (METHODS.get("sobol"), {"grid_size": 16, "n_designs": 1024}, "264,192 forwards"),
        (METHODS.get("smoothgrad"), {"n_samples": 1024}, "590 MiB at once"),
        (SCORES.get("mu_fidelity"), {"n_subsets": 4096}, "1,764 MiB at once"),
    ],
)
def test_hostile_settings_are_refused_with_their_cost_and_the_budget(
    member: Member,
    params: dict,
    message: str,  # type: ignore[type-arg]
) -> None:
    cost = member.cost(member.resolve_params(params, SHAPE_224), SHAPE_224)  # type: ignore[attr-defined]
    with pytest.raises(ResourceLimitError) as refused:
        check_budget([Item(member.name, cost)], Limits())
    text = str(refused.value)
    assert message in text and "per-request budget" in text and "SALIENCY_LIMIT_MAX_" in text


def test_a_request_over_budget_in_all_names_its_dearest_part_and_the_total() -> None:
    sobol, rise = Cost(forwards=25_000), Cost(forwards=1_024)
    two_targets = [Item("sobol (n_designs=512)", sobol, 2), Item("rise (defaults)", rise, 2)]
    assert check_budget(two_targets, Limits()).forwards == 52_048
    three_targets = [Item(item.label, item.cost, 3) for item in two_targets]
    with pytest.raises(ResourceLimitError) as refused:
        check_budget(three_targets, Limits())
    assert str(refused.value).startswith(
        "sobol (n_designs=512) costs 25,000 forwards x 3 = 75,000 (the request: 78,072 "
        "forwards in all); the per-request budget is 65,536 forwards "
        "(SALIENCY_LIMIT_MAX_FORWARDS)"
    )


def test_gradient_rows_and_forwards_have_budgets_of_their_own() -> None:
    limits = Limits(max_forwards=100, max_backward_rows=10)
    check_budget([Item("a", Cost(forwards=100, backward_rows=10))], limits)
    with pytest.raises(ResourceLimitError, match="11 gradient rows"):
        check_budget([Item("a", Cost(backward_rows=11))], limits)
    with pytest.raises(ResourceLimitError, match="the request: 101 forwards in all"):
        check_budget([Item("a", Cost(forwards=60)), Item("b", Cost(forwards=41))], limits)


def test_limits_come_from_the_environment_typed_and_positive() -> None:
    limits = Limits.from_env(
        {"SALIENCY_LIMIT_MAX_FORWARDS": "1000", "SALIENCY_LIMIT_DEFAULT_DEADLINE_S": "2.5"}
    )
    assert (limits.max_forwards, limits.default_deadline_s) == (1000, 2.5)
    assert limits.max_backward_rows == Limits().max_backward_rows
    for bad in ("0", "-3", "nan", "inf", "many", "1.5"):
        with pytest.raises(ValueError, match="SALIENCY_LIMIT_MAX_FORWARDS must be a positive int"):
            Limits.from_env({"SALIENCY_LIMIT_MAX_FORWARDS": bad})
