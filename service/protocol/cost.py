"""What a request's work costs, stated before it runs, and the per-request budget.

Every method and score states its cost from its resolved parameters and the model's input
shape (``spec.cost(params, (C, H, W)) -> Cost``, for one image). The pipeline adds up a
request's explanations and scores at planning time, before any decode or forward, and
refuses a request over the budget of :class:`~service.protocol.limits.Limits` with
RESOURCE_EXHAUSTED, naming what costs most and the budget. Standard library only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from service.protocol.errors import ResourceLimitError
from service.protocol.limits import Limits

MIB = 1024 * 1024


@dataclass(frozen=True)
class Cost:
    """The work of one explanation (or one score of one map) of one image.

    Attributes:
        forwards: rows through a forward-only pass (ONNX Runtime, or torch without
            autograd).
        backward_rows: rows through a forward and a backward pass (torch autograd), each
            about two to three forwards' worth of compute.
        memory_bytes: the buffers the work holds at once whose size follows its parameters
            or the input (noise, masks, designs, accumulators). The model's activations and
            the chunk of perturbed inputs in flight are not counted: ``chunk_size`` bounds
            them whatever the parameters.
    """

    forwards: int = 0
    backward_rows: int = 0
    memory_bytes: int = 0

    def __add__(self, other: Cost) -> Cost:
        """Work done one after the other: counts add up, memory is the larger peak."""
        return Cost(
            self.forwards + other.forwards,
            self.backward_rows + other.backward_rows,
            max(self.memory_bytes, other.memory_bytes),
        )

    def times(self, count: int) -> Cost:
        """``count`` such pieces of work, one after the other."""
        return Cost(self.forwards * count, self.backward_rows * count, self.memory_bytes)


@dataclass(frozen=True)
class Item:
    """One line of a request's bill: what (``"sobol (n_designs=64)"``), its cost, how many."""

    label: str
    cost: Cost
    count: int = 1

    @property
    def total(self) -> Cost:
        return self.cost.times(self.count)


_UNITS = (
    ("forwards", "max_forwards", "forwards"),
    ("backward_rows", "max_backward_rows", "gradient rows"),
)


def check_budget(items: Sequence[Item], limits: Limits) -> Cost:
    """The request's total cost; ``ResourceLimitError`` when it is over ``limits``.

    The message names the item that costs most, the request's total when it has several
    items, and the budget with the variable that sets it, e.g. ``"sobol (n_designs=16384)
    costs 2,162,688 forwards; the per-request budget is 65,536 forwards
    (SALIENCY_LIMIT_MAX_FORWARDS)"``.
    """
    total = Cost()
    for item in items:
        total = total + item.total
    for field, limit_name, unit in _UNITS:
        budget = getattr(limits, limit_name)
        spent = getattr(total, field)
        if spent > budget:
            worst = max(items, key=lambda item: getattr(item.total, field))
            raise ResourceLimitError(
                f"{_describe(worst, field, unit)}"
                f"{_in_all(spent, unit) if len(items) > 1 else ''}; the per-request budget "
                f"is {budget:,} {unit} ({Limits.variable(limit_name)}): ask for fewer "
                "samples, steps or explanations"
            )
    if total.memory_bytes > limits.max_memory_bytes:
        worst = max(items, key=lambda item: item.cost.memory_bytes)
        raise ResourceLimitError(
            f"{worst.label} holds {worst.cost.memory_bytes / MIB:,.0f} MiB at once; the "
            f"per-request budget is {limits.max_memory_bytes / MIB:,.0f} MiB "
            f"({Limits.variable('max_memory_bytes')}): ask for fewer samples, masks or "
            "designs, or a coarser grid"
        )
    return total


def _describe(item: Item, field: str, unit: str) -> str:
    each = getattr(item.cost, field)
    if item.count == 1:
        return f"{item.label} costs {each:,} {unit}"
    return f"{item.label} costs {each:,} {unit} x {item.count} = {each * item.count:,}"


def _in_all(spent: int, unit: str) -> str:
    return f" (the request: {spent:,} {unit} in all)"
