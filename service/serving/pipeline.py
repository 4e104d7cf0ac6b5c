"""From ``ExplainRequest`` protos to ``ExplainResponse`` protos, a batch at a time.

One code path serves the unary and the streaming call: ``Explainer.run`` yields events
(prediction, explanation, scores, done) per request as work completes, and callers either
forward them (streaming) or collect them (unary). Work is batched across requests: one
forward for the whole batch, then one engine call per (method, parameters, seed) group.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from service._proto.saliency.v1 import saliency_pb2 as pb
from service.engine import masks
from service.engine.registry import MethodSpec, ResolvedParams, list_methods
from service.engine.scores import compute_scores
from service.protocol.errors import (
    CancelledError,
    DeadlineExceededError,
    EngineError,
    InvalidInputError,
    ResourceLimitError,
    TargetOutOfRangeError,
    code_name,
)
from service.protocol.limits import Limits
from service.runtime.artifacts import ModelBundle
from service.serving import codec

DEFAULT_METHOD = "vanilla_gradient"
DEFAULT_PREDICT_TOP_K = 5
DEFAULT_PERCENTILE = 95.0
DEFAULT_FG_QUANTILE = 0.95
DEFAULT_BG_QUANTILE = 0.30
SCORE_NAMES = {
    pb.SCORE_DELETION_AUC: "deletion_auc",
    pb.SCORE_INSERTION_AUC: "insertion_auc",
    pb.SCORE_MU_FIDELITY: "mu_fidelity",
}
_ENUM_PREFIX = "METHOD_"


def method_name(value: int) -> str:
    """Registry name of a ``Method`` enum value; INVALID_ARGUMENT for unset or unknown."""
    if value == pb.METHOD_UNSPECIFIED:
        raise InvalidInputError("method is unset: choose one of " + _known_methods())
    if value not in pb.Method.values():
        raise InvalidInputError(f"unknown method number {value}: choose one of {_known_methods()}")
    return pb.Method.Name(pb.Method.ValueType(value)).removeprefix(_ENUM_PREFIX).lower()


def method_enum(name: str) -> pb.Method.ValueType:
    return pb.Method.Value(_ENUM_PREFIX + name.upper())


def _known_methods() -> str:
    return ", ".join(_ENUM_PREFIX + spec.name.upper() for spec in list_methods())


@dataclass
class _Work:
    spec: MethodSpec
    params: ResolvedParams
    target: int


@dataclass
class Job:
    """One request in a batch, with everything computed for it so far."""

    request: pb.ExplainRequest
    deadline: float | None = None
    cancelled: Callable[[], bool] | None = None
    pixels: np.ndarray | None = None
    model_input: np.ndarray | None = None
    probabilities: np.ndarray | None = None
    work: list[_Work] = field(default_factory=list)
    explanations: list[pb.Explanation] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    error: pb.Error | None = None
    started: float = field(default_factory=time.perf_counter)

    def fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = pb.Error(code=code_name(exc), message=str(exc) or type(exc).__name__)

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


@dataclass
class Event:
    """Something a request can be told now: ``kind`` in prediction/explanation/scores/done."""

    kind: str
    job: Job
    message: pb.PredictResponse | pb.Explanation | pb.ScoreUpdate | pb.ExplainResponse


class Explainer:
    """Serves one model bundle; safe to share between threads (no per-call state here)."""

    def __init__(self, bundle: ModelBundle, limits: Limits | None = None) -> None:
        self.bundle = bundle
        self.meta = bundle.meta
        self.limits = limits or Limits()
        self.model_ref = pb.ModelRef(name=self.meta.name, version=self.meta.version)

    # -- model info -------------------------------------------------------------------
    def model_info(self) -> pb.ModelInfo:
        channels, height, width = self.meta.input_size
        methods = [
            pb.MethodInfo(
                method=method_enum(spec.name),
                name=spec.name,
                description=spec.description,
                paper=spec.paper,
                needs_gradients=spec.needs_gradients,
                batchable=spec.batchable,
                defaults=spec.defaults.wire(),
                available=not spec.needs_layer or self.bundle.engine.target_layer is not None,
            )
            for spec in list_methods()
        ]
        return pb.ModelInfo(
            model=self.model_ref,
            labels=self.meta.labels,
            channels=channels,
            height=height,
            width=width,
            mean=self.meta.mean,
            std=self.meta.std,
            target_layer=self.meta.target_layer or "",
            methods=methods,
        )

    # -- predict ----------------------------------------------------------------------
    def predict_batch(self, requests: Sequence[pb.PredictRequest]) -> list[pb.PredictResponse]:
        jobs = [
            Job(request=pb.ExplainRequest(image=r.image, top_k=r.top_k or DEFAULT_PREDICT_TOP_K))
            for r in requests
        ]
        self._decode(jobs)
        self._forward(jobs)
        return [self._prediction(job, job.request.top_k) for job in jobs]

    def _prediction(self, job: Job, top_k: int) -> pb.PredictResponse:
        if job.error is not None or job.probabilities is None:
            return pb.PredictResponse(model=self.model_ref, error=job.error)
        k = min(max(top_k, 1), len(self.meta.labels))
        order = np.argsort(-job.probabilities, kind="stable")[:k]
        return pb.PredictResponse(
            model=self.model_ref,
            predictions=[
                pb.Prediction(
                    index=int(i), label=self.meta.labels[i], probability=float(job.probabilities[i])
                )
                for i in order
            ],
            timings=_timings(job.timings),
        )

    # -- explain ----------------------------------------------------------------------
    def explain_batch(
        self, requests: Sequence[pb.ExplainRequest], deadlines: Sequence[float | None] | None = None
    ) -> list[pb.ExplainResponse]:
        """Unary: every request's complete response (or its ``error``), in order."""
        jobs = self.jobs(requests, deadlines)
        done: dict[int, pb.ExplainResponse] = {}
        for event in self.run(jobs):
            if event.kind == "done":
                done[id(event.job)] = event.message  # type: ignore[assignment]
        return [done[id(job)] for job in jobs]

    def jobs(
        self, requests: Sequence[pb.ExplainRequest], deadlines: Sequence[float | None] | None = None
    ) -> list[Job]:
        deadlines = deadlines or [None] * len(requests)
        return [Job(request=r, deadline=d) for r, d in zip(requests, deadlines, strict=True)]

    def run(self, jobs: list[Job]) -> Iterator[Event]:
        """Do all the work of ``jobs``, yielding each result as soon as it exists."""
        self._decode(jobs)
        self._forward(jobs)
        for job in jobs:
            if job.error is None:
                try:
                    self._plan(job)
                except EngineError as exc:
                    job.fail(exc)
            if job.error is None:
                predict_k = max(job.request.top_k, DEFAULT_PREDICT_TOP_K)
                yield Event("prediction", job, self._prediction(job, predict_k))
        for group in self._groups(jobs):
            yield from self._explain_group(group)
        for job in jobs:
            yield Event("done", job, self._response(job))

    def _decode(self, jobs: list[Job]) -> None:
        _, height, width = self.meta.input_size
        for job in jobs:
            start = time.perf_counter()
            try:
                if job.stopped():
                    raise job.stop_error()
                job.pixels = codec.decode_image(job.request.image, self.limits)
                job.model_input = codec.to_model_input(job.pixels, height, width)
            except EngineError as exc:
                job.fail(exc)
            job.add_time("decode", time.perf_counter() - start)

    def _forward(self, jobs: list[Job]) -> None:
        ready = [job for job in jobs if job.error is None]
        if not ready:
            return
        start = time.perf_counter()
        batch = np.stack([job.model_input for job in ready])  # type: ignore[misc]
        logits = self.bundle.forward(batch).astype(np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        probabilities = np.exp(logits)
        probabilities /= probabilities.sum(axis=1, keepdims=True)
        elapsed = time.perf_counter() - start
        for job, row in zip(ready, probabilities, strict=True):
            job.probabilities = row.astype(np.float32)
            job.add_time("forward", elapsed)

    def _plan(self, job: Job) -> None:
        """Validate methods, parameters and targets; list the (method, target) work."""
        request = job.request
        num_classes = len(self.meta.labels)
        if request.target_classes:
            for target in request.target_classes:
                if target >= num_classes:
                    raise TargetOutOfRangeError(
                        f"target class {target} is out of range: the model has {num_classes} "
                        f"classes (0..{num_classes - 1})"
                    )
            targets = list(dict.fromkeys(int(t) for t in request.target_classes))
        else:
            top_k = request.top_k or 1
            if top_k > min(num_classes, self.limits.max_top_k):
                raise InvalidInputError(
                    f"top_k {top_k} exceeds the {min(num_classes, self.limits.max_top_k)} "
                    "classes that can be explained"
                )
            assert job.probabilities is not None
            targets = [int(i) for i in np.argsort(-job.probabilities, kind="stable")[:top_k]]
        methods = list(request.methods) or [pb.MethodRequest(method=method_enum(DEFAULT_METHOD))]
        if len(methods) * len(targets) > self.limits.max_explanations:
            raise ResourceLimitError(
                f"{len(methods)} methods x {len(targets)} targets = "
                f"{len(methods) * len(targets)} explanations; the limit is "
                f"{self.limits.max_explanations} per request"
            )
        for score in request.scores:
            if score not in SCORE_NAMES:
                raise InvalidInputError(
                    f"unknown score {score}: choose from {', '.join(pb.Score.keys()[1:])}"
                )
        for method in methods:
            spec, params = self.bundle.engine.resolve_params(
                method_name(method.method), dict(method.params)
            )
            job.work.extend(_Work(spec, params, target) for target in targets)
        _mask_options(request.mask)  # validate now, not after the expensive part

    def _groups(self, jobs: list[Job]) -> list[list[tuple[Job, _Work]]]:
        """(job, work) pairs grouped so that each group is one engine call."""
        groups: dict[tuple[object, ...], list[tuple[Job, _Work]]] = {}
        for job in jobs:
            if job.error is not None:
                continue
            for work in job.work:
                key = (work.spec.name, work.params, job.request.seed)
                groups.setdefault(key, []).append((job, work))
        return list(groups.values())

    def _explain_group(self, group: list[tuple[Job, _Work]]) -> Iterator[Event]:
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
            attribution = self.bundle.engine.explain(
                inputs,
                targets,
                spec.name,
                params,
                seed=int(live[0][0].request.seed),
                # Shared work stops only when nobody in the group still wants it.
                cancelled=lambda: all(job.stopped() for job, _ in live),
            )
        except EngineError as exc:
            for job, _ in live:
                job.fail(job.stop_error() if job.stopped() else exc)
            return
        elapsed = time.perf_counter() - start
        maps = attribution.maps.detach().float().cpu().numpy()
        completeness = (
            attribution.completeness_error.detach().float().cpu().numpy()
            if attribution.completeness_error is not None
            else None
        )
        produced: list[tuple[Job, int, int]] = []  # (job, item index in group, explanation index)
        for item, (job, work) in enumerate(live):
            job.add_time("explain", elapsed / len(live))
            explanation = self._explanation(job, work, maps[item], elapsed / len(live))
            if completeness is not None:
                explanation.completeness_error = float(completeness[item])
            job.explanations.append(explanation)
            produced.append((job, item, len(job.explanations) - 1))
            yield Event("explanation", job, explanation)
        yield from self._score_group(live, maps, produced)

    def _explanation(
        self, job: Job, work: _Work, saliency: np.ndarray, seconds: float
    ) -> pb.Explanation:
        assert job.pixels is not None
        height, width = job.pixels.shape[:2]
        start = time.perf_counter()
        full = codec.resize_map(saliency, height, width)
        kind, percentile, fg, bg = _mask_options(job.request.mask)
        mask = None
        if kind == pb.MASK_KIND_THRESHOLD:
            mask = masks.threshold_mask(full, percentile=percentile)
        elif kind == pb.MASK_KIND_GRABCUT:
            mask = masks.grabcut_mask(job.pixels, full, fg_quantile=fg, bg_quantile=bg)
        box = masks.largest_component_box(mask) if mask is not None else None
        job.add_time("mask", time.perf_counter() - start)
        start = time.perf_counter()
        explanation = pb.Explanation(
            method=method_enum(work.spec.name),
            target=work.target,
            target_label=self.meta.labels[work.target],
            map=codec.encode_map(full, job.request.map_encoding),
            params=work.params.wire(),
            seconds=seconds,
        )
        if mask is not None:
            explanation.mask.CopyFrom(codec.encode_mask(mask, kind))
        if box is not None:
            explanation.box.CopyFrom(
                pb.Box(x_min=box.x_min, y_min=box.y_min, x_max=box.x_max, y_max=box.y_max)
            )
        job.add_time("encode", time.perf_counter() - start)
        return explanation

    def _score_group(
        self,
        live: list[tuple[Job, _Work]],
        maps: np.ndarray,
        produced: list[tuple[Job, int, int]],
    ) -> Iterator[Event]:
        wanted = [(job, item, index) for job, item, index in produced if job.request.scores]
        if not wanted:
            return
        names = sorted({SCORE_NAMES[s] for job, _, _ in wanted for s in job.request.scores})

        def check() -> None:
            if all(job.stopped() for job, _, _ in wanted):
                raise CancelledError("every request of the group stopped")

        start = time.perf_counter()
        try:
            values = compute_scores(
                self.bundle.forward,
                np.stack([job.model_input for job, _, _ in wanted]),  # type: ignore[misc]
                maps[[item for _, item, _ in wanted]],
                np.array([live[item][1].target for _, item, _ in wanted]),
                names,
                seed=int(wanted[0][0].request.seed),
                check=check,
            )
        except EngineError as exc:
            for job, _, _ in wanted:
                job.fail(job.stop_error() if job.stopped() else exc)
            return
        elapsed = time.perf_counter() - start
        by_name = {v: k for k, v in SCORE_NAMES.items()}
        for row, (job, _, index) in enumerate(wanted):
            job.add_time("score", elapsed / len(wanted))
            requested = {SCORE_NAMES[s] for s in job.request.scores}
            scores = [
                pb.ScoreValue(score=by_name[name], value=float(values[name][row]))
                for name in names
                if name in requested
            ]
            job.explanations[index].scores.extend(scores)
            yield Event("scores", job, pb.ScoreUpdate(explanation_index=index, scores=scores))

    def _response(self, job: Job) -> pb.ExplainResponse:
        if job.error is not None:
            return pb.ExplainResponse(model=self.model_ref, error=job.error)
        job.timings["total"] = time.perf_counter() - job.started
        prediction = self._prediction(job, max(job.request.top_k, DEFAULT_PREDICT_TOP_K))
        return pb.ExplainResponse(
            model=self.model_ref,
            predictions=prediction.predictions,
            explanations=job.explanations,
            timings=_timings(job.timings),
        )


def _mask_options(options: pb.MaskOptions) -> tuple[pb.MaskKind.ValueType, float, float, float]:
    kind = options.kind or pb.MASK_KIND_THRESHOLD
    if kind not in pb.MaskKind.values():
        raise InvalidInputError(f"unknown mask kind {kind}")
    percentile = options.percentile or DEFAULT_PERCENTILE
    fg = options.foreground_quantile or DEFAULT_FG_QUANTILE
    bg = options.background_quantile or DEFAULT_BG_QUANTILE
    if not 0.0 < percentile < 100.0:
        raise InvalidInputError(f"mask percentile must be in (0, 100), got {percentile}")
    if not 0.0 < bg < fg < 1.0:
        raise InvalidInputError(
            f"mask quantiles need 0 < background ({bg}) < foreground ({fg}) < 1"
        )
    return kind, percentile, fg, bg


def _timings(timings: dict[str, float]) -> list[pb.StageTiming]:
    return [pb.StageTiming(stage=k, seconds=v) for k, v in timings.items()]
