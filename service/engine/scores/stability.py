"""Stability of a map under small changes of the input: max-sensitivity (Yeh et al. 2019)
and rank stability, from one pass of re-explanations shared by both.

The method that made the map is run again on ``n_perturbations`` copies ``x + d_j`` of each
image, ``d_j`` uniform in the L-inf ball of radius ``radius`` (every pixel and channel, the
same draws for every image of a call, seeded by the request) and clipped to ``[0, 1]``,
which keeps ``|d_j|_inf <= radius``. It runs with the request's parameters *and seed*: a
stochastic method (SmoothGrad, RISE, LIME...) draws the same noise or masks again, so
what moves the map is the input alone, not the sampler.

* ``max_sensitivity = max_j |Phi(x + d_j) - Phi(x)| / |Phi(x)|`` with Frobenius norms over
  the map: Yeh et al.'s SENS_MAX (a Monte-Carlo estimate of the sup over the ball),
  divided by the map's own norm so that methods in different units compare. 0 when the map
  does not move. When ``Phi(x) = 0`` it is 0 if every ``Phi(x + d_j)`` is 0 too, ``+inf``
  otherwise. Lower is better.
* ``rank_stability = mean_j Spearman(Phi(x), Phi(x + d_j))`` over pixels, average ranks for
  ties: does the *order* of importance survive? (Rank correlation is how Ghorbani et al.
  2019 measure an explanation's fragility.) A constant map ranks nothing: two constant
  maps count as 1 (the same order, none), a constant and a varying one as 0. In
  ``[-1, 1]``; higher is better.

Two scores, not one: they answer different questions (how far the map moves; whether
what it ranks first stays first) and go in opposite directions. Asked together with the
same parameters they share one pass. ``Phi(x)`` is the map being scored; the host passes
the method as a bound :data:`~service.engine.scores.base.Explainer`.

Cost: ``n_perturbations`` explanations of every image, i.e. ``n_perturbations`` times the
method's own cost, on top of it. Fel et al.'s MeGe and ReCo (2022) judge explanations
across models retrained on subsets of the data: they need those retrained models, and
cannot be computed per request.
"""

from __future__ import annotations

import numpy as np

from service.engine.perturb import Check
from service.engine.registry import InputShape, Param, ResolvedParams, register_score
from service.engine.scores.base import Explainer, ScoreContext, check_inputs
from service.protocol.cost import Cost
from service.protocol.errors import UnsupportedMethodError

YEH_2019 = "https://arxiv.org/abs/1901.09392"
GHORBANI_2019 = "https://arxiv.org/abs/1710.10547"  # rank correlation as fragility measure
PARAMS = (
    Param(
        "n_perturbations",
        "int",
        8,
        "perturbed copies of each image, each explained again (the score's cost)",
        minimum=1,
        maximum=64,
    ),
    Param(
        "radius",
        "float",
        0.05,
        "L-inf radius of the uniform input noise, in pixel units of [0, 1]",
        minimum=0.0,
        maximum=1.0,
        minimum_exclusive=True,
    ),
)
SCORES = ("max_sensitivity", "rank_stability")


def cost(params: ResolvedParams, input_shape: InputShape) -> Cost:
    """No forward of its own: its work is ``n_perturbations`` explanations of each map,
    which planning bills to the method (``ScoreSpec.reexplains``). It holds a noise image
    (float32) and five float64 maps (the map, the moved one, their difference, two ranks)."""
    channels, height, width = input_shape
    return Cost(memory_bytes=4 * channels * height * width + 40 * height * width)


def reexplains(params: ResolvedParams) -> int:
    """Explanations of each map the pass runs again."""
    return int(params["n_perturbations"])


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks ``0..P-1`` of each row, tied values sharing their average rank, float64."""
    ranks = np.empty(values.shape, dtype=np.float64)
    for i, row in enumerate(values):
        _, inverse, counts = np.unique(row, return_inverse=True, return_counts=True)
        first = np.cumsum(counts) - counts
        ranks[i] = (first + (counts - 1) / 2.0)[inverse]
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise Spearman correlation of ``(N, P)`` arrays: exactly 1 for the same order
    (both rows constant included), 0 when only one row is constant."""
    ra, rb = average_ranks(a), average_ranks(b)
    ra -= ra.mean(axis=1, keepdims=True)
    rb -= rb.mean(axis=1, keepdims=True)
    spread_a, spread_b = np.sqrt((ra * ra).sum(axis=1)), np.sqrt((rb * rb).sum(axis=1))
    flat_a, flat_b = spread_a == 0, spread_b == 0
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = (ra * rb).sum(axis=1) / (spread_a * spread_b)
    rho = np.where(flat_a | flat_b, np.where(flat_a & flat_b, 1.0, 0.0), rho)
    rho = np.where((ra == rb).all(axis=1), 1.0, rho)  # the same order: 1, not 1 - 1e-16
    return np.clip(rho, -1.0, 1.0)


def relative_change(reference: np.ndarray, moved: np.ndarray) -> np.ndarray:
    """``|moved - reference| / |reference|`` per row; 0/0 is 0 and c/0 is ``+inf``."""
    change = np.linalg.norm(moved - reference, axis=1)
    norm = np.linalg.norm(reference, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = change / norm
    return np.where(norm > 0, ratio, np.where(change > 0, np.inf, 0.0))


def stability(
    explain: Explainer,
    images: np.ndarray,
    maps: np.ndarray,
    targets: np.ndarray,
    *,
    n_perturbations: int,
    radius: float,
    seed: int,
    check: Check | None = None,
) -> dict[str, np.ndarray]:
    """Both stability scores of each map, from ``n_perturbations`` re-explanations.

    Args:
        explain: the method that made ``maps``, bound to its parameters and seed.
        images: float32 ``(N, C, H, W)`` pixels in ``[0, 1]``.
        maps: ``(N, H, W)`` maps of ``images``.
        targets: ``(N,)`` class per image.
        n_perturbations, radius: see ``PARAMS``.
        seed: seed of the perturbations.
        check: called before every re-explanation; raises to stop (deadline).

    Returns:
        ``{"max_sensitivity": (N,), "rank_stability": (N,)}``, float64.

    Paper: https://arxiv.org/abs/1901.09392
    """
    images, maps, targets = check_inputs(images, maps, targets)
    reference = maps.reshape(maps.shape[0], -1)
    rng = np.random.default_rng(seed)
    sensitivity = np.zeros(reference.shape[0])
    rank_sum = np.zeros(reference.shape[0])
    for _ in range(n_perturbations):
        if check is not None:
            check()
        noise = rng.uniform(-radius, radius, size=images.shape[1:]).astype(np.float32)
        moved = np.asarray(explain(np.clip(images + noise, 0.0, 1.0), targets), np.float64)
        moved = moved.reshape(reference.shape)
        sensitivity = np.maximum(sensitivity, relative_change(reference, moved))
        rank_sum += spearman(reference, moved)
    return {"max_sensitivity": sensitivity, "rank_stability": rank_sum / n_perturbations}


def _shared_pass(
    ctx: ScoreContext, images: np.ndarray, maps: np.ndarray, targets: np.ndarray, name: str
) -> np.ndarray:
    """``name`` from the one pass every stability score of the call with its parameters shares."""
    if ctx.explain is None:
        raise UnsupportedMethodError(f"score {name!r} re-runs the explanation method; none given")
    params = ctx.requested[name]
    key = ("stability", *params.values())
    if key not in ctx.memo:
        ctx.memo[key] = stability(
            ctx.explain,
            images,
            maps,
            targets,
            n_perturbations=int(params["n_perturbations"]),
            radius=float(params["radius"]),
            seed=ctx.seed,
            check=ctx.check,
        )
    values: dict[str, np.ndarray] = ctx.memo[key]  # type: ignore[assignment]
    return values[name]


def _register(name: str, higher_is_better: bool, description: str, paper: str) -> None:
    """Register one of the two: the same pass, read for ``name``."""

    def score(
        ctx: ScoreContext,
        images: np.ndarray,
        maps: np.ndarray,
        targets: np.ndarray,
        *,
        n_perturbations: int,
        radius: float,
    ) -> np.ndarray:
        return _shared_pass(ctx, images, maps, targets, name)

    score.__name__ = score.__qualname__ = name
    score.__doc__ = f"{name} per image, float64 ``(N,)``."
    register_score(
        name,
        params=PARAMS,
        higher_is_better=higher_is_better,
        cost=cost,
        reexplains=reexplains,
        description=description,
        paper=paper,
    )(score)


_register(
    "max_sensitivity",
    higher_is_better=False,
    description="Largest relative change of the map over random input changes in a small "
    "L-inf ball (Yeh et al. 2019, On the Infidelity and Sensitivity of Explanations, SENS_MAX)",
    paper=YEH_2019,
)
_register(
    "rank_stability",
    higher_is_better=True,
    description="Mean Spearman correlation of the map with the maps of randomly changed "
    "inputs (Ghorbani et al. 2019, Interpretation of Neural Networks is Fragile)",
    paper=GHORBANI_2019,
)
