"""One request's state in a batch (a ``Job``), and the news the pipeline yields (``Event``)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from service._proto.saliency.v1 import saliency_pb2 as pb
from service.protocol.errors import (
    CancelledError,
    DeadlineExceededError,
    EngineError,
    code_name,
    public_message,
)
from service.protocol.events import EventKind
from service.protocol.request import ExplainQuery
from service.serving.plan import Plan, Work

if TYPE_CHECKING:
    from service.serving.refine import Refinements

logger = logging.getLogger(__name__)


@dataclass
class Job:
    """One request in a batch, with everything computed for it so far.

    Attributes:
        request: as received; parsed into ``query`` and ``plan`` before any other work.
        deadline: ``time.monotonic()`` after which its work stops.
        cancelled: returns True once its caller went away.
        refinements: where its anytime maps go (a stream's), or ``None``: none are made.
    """

    request: pb.ExplainRequest
    deadline: float | None = None
    cancelled: Callable[[], bool] | None = None
    refinements: Refinements | None = None
    query: ExplainQuery | None = None
    plan: Plan | None = None
    pixels: np.ndarray | None = None
    model_input: np.ndarray | None = None
    probabilities: np.ndarray | None = None
    work: list[Work] = field(default_factory=list)
    explanations: list[pb.Explanation] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    error: pb.Error | None = None
    started: float = field(default_factory=time.perf_counter)

    def fail(self, exc: BaseException) -> None:
        """Record the first error; the job does no more work and its reply is the error.

        A domain error is told as it is; anything else (a bug, a library's exception) is
        INTERNAL with a fixed message, and its traceback goes to the log.
        """
        if self.error is not None:
            return
        if not isinstance(exc, EngineError):
            logger.error("a request failed on an unexpected error", exc_info=exc)
        self.error = pb.Error(code=code_name(exc), message=public_message(exc))

    def add_time(self, stage: str, seconds: float) -> None:
        self.timings[stage] = self.timings.get(stage, 0.0) + seconds

    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline

    def stopped(self) -> bool:
        """Past its deadline, or its caller went away: no more work for it."""
        return self.expired() or (self.cancelled is not None and self.cancelled())

    def stop_error(self) -> EngineError:
        if self.expired():
            return DeadlineExceededError("deadline exceeded while the request was served")
        return CancelledError("the request was cancelled")

    def check_stopped(self) -> None:
        """Raise :meth:`stop_error` when :meth:`stopped`: the check between two steps."""
        if self.stopped():
            raise self.stop_error()


@dataclass
class Event:
    """Something a request can be told now (see :class:`EventKind` for the order)."""

    kind: EventKind
    job: Job
    message: (
        pb.PredictResponse | pb.Refinement | pb.Explanation | pb.ScoreUpdate | pb.ExplainResponse
    )


Group = list[tuple[Job, Work]]
"""The (job, work) pairs of one engine call: the same method, parameters and seed."""
