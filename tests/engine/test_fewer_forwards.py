"""Coarse-to-fine occlusion and the stopping rule of RISE and Sobol, against the exhaustive
result and against a model whose answer is known by construction.

The region model's class-0 logit reads one square region only (``RegionModel`` of
``test_perturbation``); the exhaustive methods (``coarse=1``, ``tolerance=0``) are the
reference, themselves checked against Captum and closed forms in ``test_perturbation``.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
import torch

from service.engine import perturb
from service.engine.methods.occlusion import boxes
from service.engine.methods.rise import RiseMasks
from service.engine.registry import get_method
from service.engine.types import ExplainContext, NumpyForward, Progress
from service.runtime.onnx_forward import OnnxForward
from tests.engine.test_perturbation import (  # noqa: F401 (fixtures)
    REGION,
    SIZE,
    SOBOL_GRID,
    explain,
    grown_region,
    images,
    region_forward,
    region_mask,
)

# Black windows: the drop is 10 x the occluded part of the region's mean, > 0 only there.
OCCLUSION: dict[str, Any] = {"window": 4, "stride": 2, "baseline": 0.0}
COARSE: dict[str, Any] = {**OCCLUSION, "coarse": 2, "refine": 0.3}


def spearman_reference(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho by its closed form ``1 - 6 sum d^2 / (n (n^2 - 1))`` (no ties)."""
    rank_a = np.argsort(np.argsort(a.ravel())).astype(np.float64)
    rank_b = np.argsort(np.argsort(b.ravel())).astype(np.float64)
    n = rank_a.size
    return 1.0 - 6.0 * float(((rank_a - rank_b) ** 2).sum()) / (n * (n * n - 1))


def recording(forward: NumpyForward, original: np.ndarray, seen: list[tuple[int, ...]]):
    """A forward that records, per row, the box where the row differs from the image
    (``()`` for the image itself): which windows the method really ran."""

    def call(x: np.ndarray) -> np.ndarray:
        for row in x:
            ys, xs = np.nonzero((row != original[0]).any(axis=0))
            seen.append(() if ys.size == 0 else (ys.min(), ys.max() + 1, xs.min(), xs.max() + 1))
        return forward(x)

    return call


def counting(forward: NumpyForward, rows: list[int]) -> Callable[[np.ndarray], np.ndarray]:
    def call(x: np.ndarray) -> np.ndarray:
        rows.append(len(x))
        return forward(x)

    return call


# --- the shared stopping rule -----------------------------------------------------------


def test_rank_agreement_is_spearmans_rho() -> None:
    rng = np.random.default_rng(0)
    a = rng.random((8, 8))
    b = a + 0.3 * rng.random((8, 8))
    assert perturb.rank_agreement(a, b) == pytest.approx(spearman_reference(a, b), abs=1e-12)
    assert perturb.rank_agreement(a, -a) == pytest.approx(-1.0)
    assert perturb.rank_agreement(np.zeros(4), np.zeros(4)) == 1.0
    assert perturb.rank_agreement(np.zeros(4), a[0, :4]) == 0.0


def test_checkpoints_double_from_the_floor_to_the_ceiling() -> None:
    assert perturb.doubling(32, 256) == [32, 64, 128, 256]
    assert perturb.doubling(24, 100) == [24, 48, 96, 100]
    assert perturb.doubling(512, 256) == [256]  # a floor above the ceiling is the ceiling


def test_each_image_stops_when_its_own_estimate_holds_its_rank_order() -> None:
    # Image 0's estimate is the same ranking at every look (stops at the second look);
    # image 1's ranking flips each time (runs to the ceiling); tolerance 0 never stops.
    ran: list[tuple[int, int, list[int]]] = []

    def run(lo: int, hi: int, active: np.ndarray) -> None:
        ran.append((lo, hi, active.tolist()))

    def estimate(item: int, used: int) -> np.ndarray:
        base = np.arange(10.0)
        return base if item == 0 or used in (4, 16) else base[::-1]

    used = perturb.until_stable([4, 8, 16, 32], 2, 0.05, run, estimate)
    assert used.tolist() == [8, 32]
    assert ran == [(0, 4, [0, 1]), (4, 8, [0, 1]), (8, 16, [1]), (16, 32, [1])]
    ran.clear()
    assert perturb.until_stable([4, 8, 16], 2, 0.0, run, estimate).tolist() == [16, 16]


# --- occlusion, coarse to fine ----------------------------------------------------------


def test_coarse_to_fine_occlusion_is_exhaustive_where_it_refined(
    region_forward: OnnxForward,  # noqa: F811
) -> None:
    x, target = images(1), torch.tensor([0])
    exhaustive = explain("occlusion", region_forward, x, target, **OCCLUSION, coarse=1)[0]
    seen: list[tuple[int, ...]] = []
    forward = recording(region_forward, x.numpy(), seen)
    ours = explain("occlusion", forward, x, target, **COARSE)[0]

    fine = boxes(SIZE, SIZE, 4, 2)
    coarse = boxes(SIZE, SIZE, 8, 4)
    refined = int(np.ceil(0.3 * len(fine)))
    assert len(seen) == 1 + len(coarse) + refined  # the image, every coarse window, 30 %
    assert (
        len(seen)
        == get_method("occlusion")
        .cost(get_method("occlusion").resolve_params(COARSE), (3, SIZE, SIZE))
        .forwards
    )
    assert len(seen) < 0.6 * (1 + len(fine))
    # Pixels all of whose fine windows ran carry the exhaustive value exactly.
    ran = {box for box in seen[1 + len(coarse) :]}
    assert ran <= set(fine) and len(ran) == refined
    complete = np.ones((SIZE, SIZE), dtype=bool)
    for box in set(fine) - ran:
        y0, y1, x0, x1 = box
        complete[y0:y1, x0:x1] = False
    assert region_mask().sum() <= complete.sum()
    np.testing.assert_allclose(ours[complete], exhaustive[complete], rtol=1e-5, atol=1e-6)
    # ...and they cover the region the logit reads: the refinement went where it matters.
    assert complete[region_mask()].mean() > 0.9
    # The whole map ranks as the exhaustive one does, and peaks on the region.
    assert perturb.rank_agreement(ours, exhaustive) > 0.9
    y, x_ = np.unravel_index(int(np.argmax(ours)), ours.shape)
    assert region_mask()[y, x_]


def test_refining_every_window_is_the_exhaustive_occlusion(
    region_forward: OnnxForward,  # noqa: F811
) -> None:
    x, target = images(2, seed=4), torch.tensor([0, 1])
    exhaustive = explain("occlusion", region_forward, x, target, **OCCLUSION, coarse=1)
    rows: list[int] = []
    everything = explain(
        "occlusion", counting(region_forward, rows), x, target, **OCCLUSION, coarse=2, refine=1.0
    )
    np.testing.assert_array_equal(everything, exhaustive)
    assert sum(rows) == 2 * (1 + len(boxes(SIZE, SIZE, 4, 2)))  # no coarse pass


# --- RISE and Sobol: stopping against the full count ------------------------------------


@pytest.mark.parametrize(
    ("name", "ceiling", "floor", "per_point"),
    [("rise", 1024, 32, 1), ("sobol", 64, 4, 8 * 8 + 2)],
)
def test_stopping_saves_forwards_and_keeps_the_full_counts_map(
    region_forward: OnnxForward,  # noqa: F811
    name: str,
    ceiling: int,
    floor: int,
    per_point: int,
) -> None:
    sizes = {"rise": ("n_masks", "min_masks"), "sobol": ("n_designs", "min_designs")}[name]
    params: dict[str, Any] = {sizes[0]: ceiling, sizes[1]: floor}
    if name == "sobol":
        params.update(SOBOL_GRID)
    if name == "rise":
        params["substrate"] = "zero"  # the region model sums pixels (test_perturbation)
    x, target = images(1, seed=2), torch.tensor([0])
    full_rows: list[int] = []
    full = explain(name, counting(region_forward, full_rows), x, target, **params, tolerance=0.0)[0]
    rows: list[int] = []
    stopped = explain(name, counting(region_forward, rows), x, target, **params, tolerance=0.1)[0]

    assert sum(full_rows) == ceiling * per_point
    checkpoints = [n * per_point for n in perturb.doubling(floor, ceiling)]
    assert sum(rows) in checkpoints[1:-1], "stopped early, at a look, after the second"
    # The stopped map finds the region as the full count does: its top pixels (as many as
    # the region has) lie on the region or within half a grid cell of it (the full count:
    # all of them; RISE stopped at a quarter of its masks: 0.93 with this seed). The
    # background's order is noise at any count (the model ignores it): not compared.
    grown = grown_region().ravel()
    inside = region_mask()
    for result in (full, stopped):
        top = np.argsort(result.ravel())[::-1][: inside.sum()]
        assert grown[top].mean() > 0.9
    assert stopped[inside].mean() > stopped[~inside].mean()


def test_a_stopped_sobol_map_is_the_fixed_design_of_that_size(
    region_forward: OnnxForward,  # noqa: F811
) -> None:
    # The looks use prefixes of one scrambled Sobol sequence, and a power-of-two prefix is
    # the sequence of that size: stopping after n points is the fixed design of n.
    x, target = images(1, seed=2), torch.tensor([0])
    rows: list[int] = []
    params: dict[str, Any] = {
        **SOBOL_GRID, "n_designs": 256, "min_designs": 4, "tolerance": 0.1,
        "perturbation": "inpainting",
    }  # fmt: skip
    stopped = explain("sobol", counting(region_forward, rows), x, target, **params, seed=1)
    used = sum(rows) // (8 * 8 + 2)
    assert used < 256
    fixed = explain(
        "sobol", region_forward, x, target, n_designs=used, tolerance=0.0,
        perturbation="inpainting", seed=1, **SOBOL_GRID,
    )  # fmt: skip
    np.testing.assert_allclose(stopped, fixed, rtol=1e-5, atol=1e-7)


def test_a_stopped_rise_map_is_the_float64_mean_over_the_masks_it_used(
    region_forward: OnnxForward,  # noqa: F811
) -> None:
    x, target = images(1, seed=2), torch.tensor([0])
    rows: list[int] = []
    params: dict[str, Any] = {"n_masks": 1024, "min_masks": 32, "substrate": "zero"}
    stopped = explain("rise", counting(region_forward, rows), x, target, **params, seed=0)[0]
    used = sum(rows)
    assert used in perturb.doubling(32, 1024)[1:-1]
    # The same draw (the request's generator, seeded 0), folded in float64 here.
    expected = rise_reference(x, region_forward, 1024, used)
    np.testing.assert_allclose(stopped, expected, rtol=1e-4, atol=1e-6 * expected.max())


# --- anytime maps -----------------------------------------------------------------------


def explain_with_progress(
    name: str, forward: NumpyForward, x: torch.Tensor, interval: float = 0.0, **params: Any
) -> tuple[np.ndarray, list[Progress], list[int]]:
    spec = get_method(name)
    reports: list[Progress] = []
    rows: list[int] = []
    ctx = ExplainContext(
        model=None,
        forward_numpy=counting(forward, rows),
        generator=torch.Generator().manual_seed(0),
        progress=reports.append,
        progress_interval=interval,
    )
    targets = torch.zeros(x.shape[0], dtype=torch.long)
    maps = spec.fn(ctx, x, targets, **spec.resolve_params(params)).maps.numpy()
    return maps, reports, rows


def rise_reference(x: torch.Tensor, forward: NumpyForward, ceiling: int, used: int) -> np.ndarray:
    """RISE of the first ``used`` of ``ceiling`` masks drawn with seed 0, in float64."""
    masks = RiseMasks(ceiling, 8, 0.5, (SIZE, SIZE), torch.Generator().manual_seed(0))
    chosen = masks(0, used).astype(np.float64)
    logits = forward((x.numpy() * chosen[:, None]).astype(np.float32)).astype(np.float64)
    prob = np.exp(logits[:, 0]) / np.exp(logits).sum(axis=1)
    return np.einsum("n,nhw->hw", prob, chosen) / (used * 0.5)


def test_rise_sends_its_map_at_each_look_before_the_last(
    region_forward: OnnxForward,  # noqa: F811
) -> None:
    x = images(1, seed=2)
    params = {"n_masks": 1024, "min_masks": 32, "substrate": "zero"}
    maps, reports, rows = explain_with_progress("rise", region_forward, x, **params)
    # Looks at 32, 64, 128 masks; the fourth (256) stopped the method: its map is the result.
    assert [r.forwards for r in reports] == [32, 64, 128] and sum(rows) == 256
    first = reports[0]
    assert first.maps.shape == (1, SIZE, SIZE) and first.maps.dtype == torch.float32
    expected = rise_reference(x, region_forward, 1024, 32)
    np.testing.assert_allclose(first.maps[0].numpy(), expected, rtol=1e-4, atol=1e-6)
    assert not np.allclose(first.maps.numpy(), maps)


def test_occlusion_sends_its_coarse_map_first(region_forward: OnnxForward) -> None:  # noqa: F811
    x = images(2, seed=1)
    params = {**COARSE, "coarse": 2}
    maps, reports, rows = explain_with_progress("occlusion", region_forward, x, **params)
    coarse = len(boxes(SIZE, SIZE, 8, 4))
    [report] = reports
    assert report.forwards == 2 * (1 + coarse) < sum(rows)
    assert report.maps.shape == maps.shape
    # The coarse map already puts the batch's maximum drop on the region.
    for image in report.maps.numpy():
        y, x_ = np.unravel_index(int(np.argmax(image)), image.shape)
        assert region_mask()[y, x_]


def test_reports_are_rate_limited_and_per_call(region_forward: OnnxForward) -> None:  # noqa: F811
    # One report per interval: with an hour, only the first look's map goes.
    params = {"n_masks": 1024, "min_masks": 32, "substrate": "zero"}
    _, reports, _ = explain_with_progress(
        "rise", region_forward, images(1, seed=2), interval=3600.0, **params
    )
    assert [r.forwards for r in reports] == [32]
    # Two calls at once, each with its own context: each hears only its own maps.
    inputs = [images(1, seed=2), images(1, seed=2) * 0.5]
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(
            pool.map(lambda x: explain_with_progress("rise", region_forward, x, **params), inputs)
        )
    for x, (_, reports, _) in zip(inputs, results, strict=True):
        expected = rise_reference(x, region_forward, 1024, reports[0].forwards)
        np.testing.assert_allclose(reports[0].maps[0].numpy(), expected, rtol=1e-4, atol=1e-6)
