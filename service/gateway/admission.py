"""Bounded work in flight per model and per kind of call; overflow is refused at once.

A call the model server cannot start soon only waits in a queue, holds memory, and
makes everything behind it later. So the gateway counts the calls it has sent on and not
yet answered, per model and per pool (``explain``: Explain, ExplainStream and the
VisualizeClass calls, which need gradients; ``predict``: Predict and GetModelInfo, which
run in the model's forward-only pool), and answers a call
above the bound at once with RESOURCE_EXHAUSTED saying that it is retryable. The bound is
sized from the pool's workers and batch size (:meth:`Admission.sized`): enough queued
batches to keep every worker busy, and always below TorchServe's own ``job_queue_size``
so that TorchServe's queue never overflows first.

The gateway is one asyncio loop, so plain counters are enough: no lock.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

from service.protocol.errors import OverloadedError

KINDS = {"explain": "explanations", "predict": "predictions"}
"""Pool name -> what its calls are called in a message."""
RPC_KINDS = {
    "Explain": "explain",
    "ExplainStream": "explain",
    "Predict": "predict",
    "GetModelInfo": "predict",
    "VisualizeClass": "explain",
    "VisualizeClassStream": "explain",
    "GetConcepts": "predict",
}


@dataclass(frozen=True)
class PoolSize:
    """A pool's workers and batch size, what its bound is sized from."""

    workers: int
    batch_size: int

    def bound(self, batches_per_worker: int) -> int:
        """Calls in flight: ``batches_per_worker`` full batches queued for every worker."""
        return max(1, self.workers * self.batch_size * batches_per_worker)


class Admission:
    """In-flight counters per (model, kind) with a bound per kind.

    Args:
        limits: kind (``explain``, ``predict``) -> most calls in flight per model.
        model_limits: model -> its own bounds per kind (a store's archives may ask for
            different workers and batch sizes), over ``limits``.
    """

    def __init__(
        self,
        limits: Mapping[str, int],
        model_limits: Mapping[str, Mapping[str, int]] | None = None,
    ) -> None:
        self.model_limits = {model: dict(own) for model, own in (model_limits or {}).items()}
        unknown = set(limits).union(*self.model_limits.values()) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown kinds {sorted(unknown)}; known: {sorted(KINDS)}")
        self.limits = dict(limits)
        self.in_flight: dict[tuple[str, str], int] = {}
        self.refused: dict[tuple[str, str], int] = {}

    @classmethod
    def sized(cls, explain: PoolSize, predict: PoolSize, batches_per_worker: int = 4) -> Admission:
        """Bounds from each pool's workers and batch size (:meth:`PoolSize.bound`)."""
        return cls(
            {
                "explain": explain.bound(batches_per_worker),
                "predict": predict.bound(batches_per_worker),
            }
        )

    def limit(self, model: str, kind: str) -> int | None:
        """The bound of ``kind`` for ``model`` (``None``: unbounded)."""
        return self.model_limits.get(model, {}).get(kind, self.limits.get(kind))

    def total(self, models: Iterable[str]) -> int:
        """Every bound of every model added up: the most calls admission can hold."""
        return sum(self.limit(model, kind) or 0 for model in models for kind in KINDS)

    @contextlib.contextmanager
    def admit(self, model: str, kind: str) -> Iterator[None]:
        """Hold one slot of ``kind`` for ``model`` for the block, or refuse at once.

        Raises:
            OverloadedError: the bound is reached; the message says to retry.
        """
        key = (model, kind)
        limit = self.limit(model, kind)
        count = self.in_flight.get(key, 0)
        if limit is not None and count >= limit:
            self.refused[key] = self.refused.get(key, 0) + 1
            raise OverloadedError(
                f"server busy: {count} {KINDS[kind]} in flight for model {model}; "
                "retry with backoff"
            )
        self.in_flight[key] = count + 1
        try:
            yield
        finally:
            self.in_flight[key] -= 1
