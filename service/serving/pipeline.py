"""From ``ExplainRequest`` protos to ``ExplainResponse`` protos, a batch at a time.

One code path serves the unary and the streaming call: ``Explainer.run`` yields events
(prediction, explanation, scores, done) per request as work completes, and callers either
forward them (streaming) or collect them (unary). A slow method's anytime maps arise
inside its engine call, so they do not wait for the generator: they go, as ``refinement``
events, straight to the job's own ``refinements`` sink (streams only; ``refine``). The
stages live in their own modules: ``plan`` (every check that needs no forward), ``codec``
(decode, encode), ``execute`` (one engine call per method/parameters/seed group, then
scores), ``replies`` (messages).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from service._proto.saliency.v1 import saliency_pb2 as pb
from service.engine.ops import softmax
from service.protocol.events import EventKind
from service.protocol.limits import Limits
from service.protocol.request import ExplainQuery, PredictQuery
from service.runtime.artifacts import ModelBundle
from service.serving import codec, execute
from service.serving.concepts import ConceptServer
from service.serving.jobs import Event, Job
from service.serving.plan import plan
from service.serving.replies import Replies

__all__ = ["Event", "Explainer", "Job"]


class Explainer:
    """Serves one model bundle; safe to share between threads (no per-call state here)."""

    def __init__(
        self,
        bundle: ModelBundle,
        limits: Limits | None = None,
        concepts_in: Path | None = None,
    ) -> None:
        """``concepts_in``: the model's folder, whose concept bank (if any) it serves."""
        self.bundle = bundle
        self.meta = bundle.meta
        self.limits = limits or Limits()
        self.replies = Replies(bundle)
        self.concepts = ConceptServer.load(bundle, concepts_in, self.limits)

    def model_info(self) -> pb.ModelInfo:
        return self.replies.model_info()

    def predict_batch(self, requests: Sequence[pb.PredictRequest]) -> list[pb.PredictResponse]:
        """Forward only: every request's predictions (or its ``error``), in order."""
        jobs = [Job(request=pb.ExplainRequest()) for _ in requests]
        top_k = []
        for job, request in zip(jobs, requests, strict=True):
            query = PredictQuery.from_pb(request)
            job.request.image.CopyFrom(query.image)
            top_k.append(query.top_k)
        self._decode(jobs)
        self._forward(jobs)
        return [self.replies.prediction(job, k) for job, k in zip(jobs, top_k, strict=True)]

    def explain_batch(
        self, requests: Sequence[pb.ExplainRequest], deadlines: Sequence[float | None] | None = None
    ) -> list[pb.ExplainResponse]:
        """Unary: every request's complete response (or its ``error``), in order."""
        jobs = self.jobs(requests, deadlines)
        done: dict[int, pb.ExplainResponse] = {}
        for event in self.run(jobs):
            if event.kind is EventKind.DONE:
                done[id(event.job)] = event.message  # type: ignore[assignment]
        return [done[id(job)] for job in jobs]

    def jobs(
        self, requests: Sequence[pb.ExplainRequest], deadlines: Sequence[float | None] | None = None
    ) -> list[Job]:
        deadlines = deadlines or [None] * len(requests)
        return [Job(request=r, deadline=d) for r, d in zip(requests, deadlines, strict=True)]

    def run(self, jobs: list[Job]) -> Iterator[Event]:
        """Do all the work of ``jobs``, yielding each result as soon as it exists: a job's
        ``done`` event as soon as its own work is over, not at the end of the batch."""
        self._plan(jobs)
        self._decode(jobs)
        self._forward(jobs)
        for job in jobs:
            if job.error is None:
                assert job.plan is not None and job.probabilities is not None
                try:
                    job.work = job.plan.work(job.probabilities)
                    prediction = self.replies.explain_prediction(job)
                except Exception as exc:
                    job.fail(exc)
                    continue
                yield Event(EventKind.PREDICTION, job, prediction)
        # A job is done once its last group is: its reply need not wait for the others'
        # work (a host may send it at once), and one that failed before any work is done
        # before any group starts.
        groups = execute.groups(jobs)
        left = Counter(id(job) for group in groups for job in execute.members(group))
        for job in jobs:
            if not left[id(job)]:
                yield Event(EventKind.DONE, job, self._response(job))
        for group in groups:
            yield from execute.explain_group(self.replies, group)
            for job in execute.members(group):
                left[id(job)] -= 1
                if not left[id(job)]:
                    yield Event(EventKind.DONE, job, self._response(job))

    def _response(self, job: Job) -> pb.ExplainResponse:
        """The job's reply, with its concepts (the last work it asked for) when it wants them."""
        found: list[pb.TargetConcepts] = []
        if job.error is None:
            try:
                found = self.concepts.explain(job)
            except Exception as exc:  # this request's own failure
                job.fail(exc)
        response = self.replies.response(job)
        response.concepts.extend(found if job.error is None else [])
        return response

    def _plan(self, jobs: list[Job]) -> None:
        for job in jobs:
            try:
                job.query = ExplainQuery.from_pb(job.request)
                job.plan = plan(job.query, self.bundle.engine, len(self.meta.labels), self.limits)
                targets = len(job.plan.targets) or job.plan.top_k
                self.concepts.check(job.request, targets, job.plan.cost)
            except Exception as exc:  # a bug in one request's checks fails that request
                job.fail(exc)

    def _decode(self, jobs: list[Job]) -> None:
        _, height, width = self.meta.input_size
        for job in jobs:
            if job.error is not None:
                continue
            start = time.perf_counter()
            try:
                job.check_stopped()
                job.pixels = codec.decode_image(job.request.image, self.limits)
                job.model_input = codec.to_model_input(job.pixels, height, width)
            except Exception as exc:
                job.fail(exc)
            job.add_time("decode", time.perf_counter() - start)

    def _forward(self, jobs: list[Job]) -> None:
        """One forward for every job still in; if it fails, each job alone (see execute)."""
        ready = [job for job in jobs if job.error is None]
        if not ready:
            return
        start = time.perf_counter()
        try:
            batch = np.stack([job.model_input for job in ready])  # type: ignore[misc]
            probabilities = softmax(self.bundle.forward(batch))
        except Exception as exc:
            if execute.shared_failure(ready, exc):
                for job in ready:
                    self._forward([job])
            return
        elapsed = time.perf_counter() - start
        for job, row in zip(ready, probabilities, strict=True):
            job.probabilities = row.astype(np.float32)
            job.add_time("forward", elapsed)
