"""Planning: every check that needs no forward pass, before any decode or batch work.

A request is refused here -- unknown method or parameter, bad value, a method's own
cross-parameter or input-size rule, target out of range, too many explanations, bad mask
options, a cost over the per-request budget -- so that an invalid request never costs a
decode, a forward or a slow group, and never shares a group with valid ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from service.engine.engine import Engine
from service.engine.registry import MASKS, SCORES, MaskSpec, MethodSpec, ResolvedParams, ScoreSpec
from service.engine.targets import check_target_range
from service.protocol.cost import Cost, Item, check_budget
from service.protocol.errors import InvalidInputError, ResourceLimitError
from service.protocol.limits import Limits
from service.protocol.request import ExplainQuery
from service.serving import codec


@dataclass(frozen=True)
class Work:
    """One explanation to compute: a method with its parameters, for one target."""

    spec: MethodSpec
    params: ResolvedParams
    target: int


@dataclass(frozen=True)
class Plan:
    """A request checked against the model: what to compute, with typed parameters.

    Attributes:
        methods: each method with its resolved parameters, in request order.
        targets: the explicit target classes (duplicates removed), or empty for top-k.
        top_k: how many predicted classes to explain when ``targets`` is empty.
        mask: the mask and its resolved parameters.
        scores: the scores of every map, in request order.
        cost: what the explanations and their scores cost in all (within the budget).
    """

    methods: tuple[tuple[MethodSpec, ResolvedParams], ...]
    targets: tuple[int, ...]
    top_k: int
    mask: tuple[MaskSpec, ResolvedParams]
    scores: tuple[ScoreSpec, ...]
    cost: Cost = field(default_factory=Cost)

    def work(self, probabilities: np.ndarray) -> list[Work]:
        """The (method, target) pairs, once the forward has given the probabilities."""
        targets = self.targets or tuple(
            int(i) for i in np.argsort(-probabilities, kind="stable")[: self.top_k]
        )
        return [Work(spec, params, t) for spec, params in self.methods for t in targets]


def plan(query: ExplainQuery, engine: Engine, num_classes: int, limits: Limits) -> Plan:
    """Check ``query`` against the model and the limits; raises the first problem found."""
    targets = tuple(dict.fromkeys(query.targets))
    if targets:
        check_target_range(targets, num_classes)
    elif query.top_k > min(num_classes, limits.max_top_k):
        raise InvalidInputError(
            f"top_k {query.top_k} exceeds the {min(num_classes, limits.max_top_k)} "
            "classes that can be explained"
        )
    count = len(query.methods) * (len(targets) or query.top_k)
    if count > limits.max_explanations:
        raise ResourceLimitError(
            f"{len(query.methods)} methods x {len(targets) or query.top_k} targets = {count} "
            f"explanations; the limit is {limits.max_explanations} per request"
        )
    codec.check_map_encoding(query.map_encoding)
    methods = tuple(engine.resolve_params(call.name, call.params) for call in query.methods)
    mask = MASKS.get(query.mask.name)
    mask_params = mask.resolve_params(query.mask.overrides(mask.params.names()))
    scores = tuple(SCORES.get(name) for name in dict.fromkeys(query.scores))
    per_method = len(targets) or query.top_k
    cost = check_budget(bill(methods, scores, per_method, engine.input_shape), limits)
    return Plan(methods, targets, query.top_k, (mask, mask_params), scores, cost)


def bill(
    methods: tuple[tuple[MethodSpec, ResolvedParams], ...],
    scores: tuple[ScoreSpec, ...],
    targets: int,
    input_shape: tuple[int, int, int],
) -> list[Item]:
    """Each method's cost per target, and each score's per map, as the budget reads them."""
    items = [
        Item(label(spec, params), spec.cost(params, input_shape), targets)
        for spec, params in methods
    ]
    maps = len(methods) * targets
    items += [Item(spec.name, spec.cost(spec.defaults, input_shape), maps) for spec in scores]
    # Scores that re-run the method (stability) cost that many more explanations of each
    # map; those of one module with the same parameters share one pass, counted once.
    passes = {
        (spec.fn.__module__, tuple(spec.defaults.items())): spec.reexplains(spec.defaults)
        for spec in scores
        if spec.reexplains is not None
    }
    if reruns := sum(passes.values()):
        items += [
            Item(f"{label(spec, params)} re-run by the stability scores",
                 spec.cost(params, input_shape), targets * reruns)
            for spec, params in methods
        ]  # fmt: skip
    return items


def label(spec: MethodSpec, params: ResolvedParams) -> str:
    """``"sobol (n_designs=1024, grid_size=16)"``: the parameters that differ from the
    defaults (validated values, so the label stays short)."""
    changed = [f"{k}={v}" for k, v in params.wire().items() if params[k] != spec.defaults[k]]
    return f"{spec.name} ({', '.join(changed) or 'defaults'})"
