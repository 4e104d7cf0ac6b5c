"""Anytime maps on the wire: a slow method's maps so far, as ``refinement`` events.

The engine hands a group's call its maps so far (occlusion's coarse pass, RISE's looks;
:class:`~service.engine.types.Progress`), at most one report per 200 ms. Here each item's
map goes to its own job -- a batch mixes several clients' requests in one call, and an
item's map reaches only the job that asked for it -- and only to a job that has a
:class:`Refinements` (a stream's). Encoding a map costs CPU that the method's own work
waits for, so a map is encoded only when its part will go: the job still wants its work,
its stream can take a part, and its explanation had no refinement for ``interval``
seconds (per explanation, whatever the engine's own rate: a group retried alone starts a
new call, and its first report would otherwise come at once).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from service.engine.types import Progress, ProgressFn
from service.protocol.events import EventKind
from service.serving.jobs import Event, Group
from service.serving.plan import Work
from service.serving.replies import Replies

logger = logging.getLogger(__name__)

RefinementKey = tuple[object, ...]


def _always() -> bool:
    return True


@dataclass
class Refinements:
    """Where a job's refinement events go, and how often.

    Attributes:
        send: receives each ``refinement`` :class:`Event`; called from the thread that
            runs the method, between its chunks.
        open: whether a part can go now (the stream is not closed or frozen); asked
            before a map is encoded.
        interval: least seconds between two refinements of one explanation.
        clock: ``time.monotonic`` (tests pass their own).
    """

    send: Callable[[Event], None]
    open: Callable[[], bool] = _always
    interval: float = 0.2
    clock: Callable[[], float] = time.monotonic
    _last: dict[RefinementKey, float] = field(default_factory=dict, repr=False)

    def due(self, key: RefinementKey) -> bool:
        """Whether explanation ``key`` may get a refinement now (its first always may)."""
        last = self._last.get(key)
        return last is None or self.clock() - last >= self.interval

    def sent(self, key: RefinementKey) -> None:
        self._last[key] = self.clock()


def key(work: Work) -> RefinementKey:
    """What a refinement and the explanation it becomes share: method, parameters, target."""
    return (work.spec.name, work.params, work.target)


def reporter(replies: Replies, live: Group) -> ProgressFn | None:
    """The progress callback of a group's engine call, or ``None`` when no member of the
    group streams (the engine then builds no anytime map at all)."""
    wanted = [(item, job, work) for item, (job, work) in enumerate(live) if job.refinements]
    if not wanted:
        return None

    def report(progress: Progress) -> None:
        # Rows of the whole call, split evenly: exact for occlusion, RISE's mean when its
        # images stop at different looks.
        forwards = progress.forwards // len(live)
        maps = None
        for item, job, work in wanted:
            sink = job.refinements
            assert sink is not None
            if job.error is not None or job.stopped() or not sink.open() or not sink.due(key(work)):
                continue
            if maps is None:
                maps = progress.maps.detach().float().cpu().numpy()
            start = time.perf_counter()
            try:
                message = replies.refinement(job, work, maps[item], forwards)
            except Exception:  # an anytime map is optional: its explanation still comes
                logger.warning("a refinement could not be built", exc_info=True)
                continue
            job.add_time("refine", time.perf_counter() - start)
            sink.sent(key(work))
            sink.send(Event(EventKind.REFINEMENT, job, message))

    return report
