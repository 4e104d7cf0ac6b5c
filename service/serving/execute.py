"""Batched execution: one engine call per (method, parameters, seed) group, then its scores.

A failure in shared work fails only the requests of that group, and work stops once every
request of the group has stopped (deadline or cancellation).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import torch

from service._proto.saliency.v1 import saliency_pb2 as pb
from service.engine.scores import compute_scores
from service.engine.scores.base import Explainer
from service.protocol import names
from service.protocol.errors import CancelledError, EngineError
from service.protocol.events import EventKind
from service.serving.jobs import Event, Job
from service.serving.plan import Work
from service.serving.replies import Replies

Group = list[tuple[Job, Work]]


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


def _fail_all(jobs: list[Job], exc: EngineError) -> None:
    for job in jobs:
        job.fail(job.stop_error() if job.stopped() else exc)


def explain_group(replies: Replies, group: Group) -> Iterator[Event]:
    """Run one group, yield each explanation as soon as it is encoded, then its scores."""
    for job, _ in group:
        if job.error is None and job.stopped():
            job.fail(job.stop_error())
    live = [(job, work) for job, work in group if job.error is None]
    if not live:
        return
    spec, params = live[0][1].spec, live[0][1].params
    start = time.perf_counter()
    try:
        inputs = torch.from_numpy(np.stack([job.model_input for job, _ in live]))  # type: ignore[misc]
        targets = torch.tensor([work.target for _, work in live], dtype=torch.long)
        attribution = replies.bundle.engine.explain(
            inputs,
            targets,
            spec.name,
            params,
            seed=live[0][0].query.seed,  # type: ignore[union-attr]
            # Shared work stops only when nobody in the group still wants it.
            cancelled=lambda: all(job.stopped() for job, _ in live),
        )
    except EngineError as exc:
        _fail_all([job for job, _ in live], exc)
        return
    elapsed = time.perf_counter() - start
    maps = attribution.maps.detach().float().cpu().numpy()
    completeness = attribution.completeness_error
    produced: list[tuple[Job, int, int]] = []  # (job, item in group, explanation index)
    for item, (job, work) in enumerate(live):
        job.add_time("explain", elapsed / len(live))
        explanation = replies.explanation(job, work, maps[item], elapsed / len(live))
        if completeness is not None:
            explanation.completeness_error = float(completeness[item])
        job.explanations.append(explanation)
        produced.append((job, item, len(job.explanations) - 1))
        yield Event(EventKind.EXPLANATION, job, explanation)
    yield from score_group(replies, live, maps, produced)


def explainer(replies: Replies, live: list[tuple[Job, Work]]) -> Explainer:
    """The group's method, parameters and seed, for the scores that re-run it (stability);
    it stops once every request of the group has stopped."""
    spec, params = live[0][1].spec, live[0][1].params
    seed = live[0][0].query.seed  # type: ignore[union-attr]

    def explain(images: np.ndarray, targets: np.ndarray) -> np.ndarray:
        attribution = replies.bundle.engine.explain(
            torch.from_numpy(images),
            torch.from_numpy(targets),
            spec.name,
            params,
            seed=seed,
            cancelled=lambda: all(job.stopped() for job, _ in live),
        )
        return attribution.maps.detach().float().cpu().numpy()

    return explain


def score_group(
    replies: Replies,
    live: list[tuple[Job, Work]],
    maps: np.ndarray,
    produced: list[tuple[Job, int, int]],
) -> Iterator[Event]:
    """The scores the group's requests asked for, in one batched call per group."""
    wanted = [(job, item, index) for job, item, index in produced if job.plan and job.plan.scores]
    if not wanted:
        return
    requested = {id(job): [s.name for s in job.plan.scores] for job, _, _ in wanted}  # type: ignore[union-attr]
    names_needed = list(dict.fromkeys(n for job_names in requested.values() for n in job_names))

    def check() -> None:
        if all(job.stopped() for job, _, _ in wanted):
            raise CancelledError("every request of the group stopped")

    start = time.perf_counter()
    try:
        values = compute_scores(
            replies.bundle.forward,
            np.stack([job.model_input for job, _, _ in wanted]),  # type: ignore[misc]
            maps[[item for _, item, _ in wanted]],
            np.array([live[item][1].target for _, item, _ in wanted]),
            names_needed,
            seed=wanted[0][0].query.seed,  # type: ignore[union-attr]
            check=check,
            explain=explainer(replies, live),
        )
    except EngineError as exc:
        _fail_all([job for job, _, _ in wanted], exc)
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
