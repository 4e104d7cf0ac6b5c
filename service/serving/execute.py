"""Batched execution: one engine call per (method, parameters, seed) group, then its scores.

Work is shared but failures are not: when a group's call raises for any reason other than
every member having stopped (deadline, cancellation), each member is run again alone, and
only those that fail alone fail -- with their own error. One poisoned input therefore costs
its group one more pass, never another request's answer. Work stops once every request of
the group has stopped.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import numpy as np
import torch

from service._proto.saliency.v1 import saliency_pb2 as pb
from service.engine.scores import compute_scores
from service.engine.scores.base import Explainer
from service.engine.types import Attribution, ProgressFn
from service.protocol import names
from service.protocol.errors import CancelledError
from service.protocol.events import EventKind
from service.serving.jobs import Event, Group, Job
from service.serving.refine import reporter
from service.serving.replies import Replies

Produced = list[tuple[Job, int, int]]  # (job, item in the group's maps, explanation index)


def groups(jobs: list[Job]) -> list[Group]:
    """(job, work) pairs grouped so that each group is one engine call."""
    found: dict[tuple[object, ...], Group] = {}
    for job in jobs:
        if job.error is not None or job.query is None:
            continue
        for work in job.work:
            key = (work.spec.name, work.params, job.query.seed)
            found.setdefault(key, []).append((job, work))
    return list(found.values())


def members(group: Group) -> list[Job]:
    """The group's jobs, each once (a job explaining several targets is there for each)."""
    return list({id(job): job for job, _ in group}.values())


def shared_failure(jobs: list[Job], exc: Exception) -> bool:
    """After shared work raised ``exc``: True when the caller should retry each job alone.

    Never when every job has stopped (the work stopped for them: each gets its own
    deadline or cancellation error) nor for a lone job (the error is its own).
    """
    if all(job.stopped() for job in jobs):
        for job in jobs:
            job.fail(job.stop_error())
        return False
    if len(jobs) == 1:
        jobs[0].fail(exc)
        return False
    return True


def explain_group(replies: Replies, group: Group) -> Iterator[Event]:
    """Run one group, yield each explanation as soon as it is encoded, then its scores."""
    for job, _ in group:
        if job.error is None and job.stopped():
            job.fail(job.stop_error())
    live = [(job, work) for job, work in group if job.error is None]
    if not live:
        return
    start = time.perf_counter()
    try:
        maps, completeness = _explain(replies, live)
    except Exception as exc:
        if shared_failure([job for job, _ in live], exc):
            for member in live:
                yield from explain_group(replies, [member])
        return
    elapsed = time.perf_counter() - start
    produced: Produced = []
    for item, (job, work) in enumerate(live):
        job.add_time("explain", elapsed / len(live))
        try:
            explanation = replies.explanation(job, work, maps[item], elapsed / len(live))
        except Exception as exc:  # its mask or encoding: this request's own failure
            job.fail(exc)
            continue
        if completeness is not None:
            explanation.completeness_error = float(completeness[item])
        job.explanations.append(explanation)
        produced.append((job, item, len(job.explanations) - 1))
        yield Event(EventKind.EXPLANATION, job, explanation)
    yield from score_group(replies, live, maps, produced)


def _explain(replies: Replies, live: Group) -> tuple[np.ndarray, np.ndarray | None]:
    """The group's engine call: maps ``(B, H, W)`` and completeness errors (or ``None``)."""
    images = np.stack([job.model_input for job, _ in live])  # type: ignore[misc]
    targets = np.array([work.target for _, work in live], dtype=np.int64)
    attribution = _run_method(replies, live, images, targets, reporter(replies, live))
    maps = attribution.maps.detach().float().cpu().numpy()
    completeness = attribution.completeness_error
    return maps, None if completeness is None else completeness.detach().cpu().numpy()


def _run_method(
    replies: Replies,
    live: Group,
    images: np.ndarray,
    targets: np.ndarray,
    progress: ProgressFn | None = None,
) -> Attribution:
    """The group's method, parameters and seed on ``images``; it stops only when nobody
    in the group still wants the work. ``progress`` gets its anytime maps (streams')."""
    spec, params = live[0][1].spec, live[0][1].params
    return replies.bundle.engine.explain(
        torch.from_numpy(images),
        torch.from_numpy(targets),
        spec.name,
        params,
        seed=live[0][0].query.seed,  # type: ignore[union-attr]
        cancelled=lambda: all(job.stopped() for job, _ in live),
        progress=progress,
    )


def explainer(replies: Replies, live: Group) -> Explainer:
    """The group's method as the scores that re-run it (stability) call it."""

    def explain(images: np.ndarray, targets: np.ndarray) -> np.ndarray:
        return _run_method(replies, live, images, targets).maps.detach().float().cpu().numpy()

    return explain


def score_group(
    replies: Replies, live: Group, maps: np.ndarray, produced: Produced
) -> Iterator[Event]:
    """The scores the group's requests asked for, in one batched call per group."""
    wanted = [(job, item, index) for job, item, index in produced if job.plan and job.plan.scores]
    if not wanted:
        return
    requested = {id(job): [s.name for s in job.plan.scores] for job, _, _ in wanted}  # type: ignore[union-attr]
    start = time.perf_counter()
    try:
        values = compute_scores(
            replies.bundle.forward,
            np.stack([job.model_input for job, _, _ in wanted]),  # type: ignore[misc]
            maps[[item for _, item, _ in wanted]],
            np.array([live[item][1].target for _, item, _ in wanted]),
            list(dict.fromkeys(n for job_names in requested.values() for n in job_names)),
            seed=wanted[0][0].query.seed,  # type: ignore[union-attr]
            check=_all_stopped([job for job, _, _ in wanted]),
            explain=explainer(replies, live),
        )
    except Exception as exc:
        if shared_failure([job for job, _, _ in wanted], exc):
            for one in wanted:
                yield from score_group(replies, live, maps, [one])
        return
    elapsed = time.perf_counter() - start
    for row, (job, _, index) in enumerate(wanted):
        job.add_time("score", elapsed / len(wanted))
        scores = [
            pb.ScoreValue(score=names.SCORES.number(name), value=float(values[name][row]))  # type: ignore[arg-type]
            for name in requested[id(job)]
        ]
        job.explanations[index].scores.extend(scores)
        update = pb.ScoreUpdate(explanation_index=index, scores=scores)
        yield Event(EventKind.SCORES, job, update)


def _all_stopped(jobs: list[Job]) -> Callable[[], None]:
    def check() -> None:
        if all(job.stopped() for job in jobs):
            raise CancelledError("every request of the group stopped")

    return check
