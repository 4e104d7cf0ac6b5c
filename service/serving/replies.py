"""Replies: predictions, explanations (map, mask, box), responses and the model's info."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from service._proto.saliency.v1 import saliency_pb2 as pb
from service.engine.cam_layer import CamLayer
from service.engine.masks import largest_component_box
from service.engine.registry import MASKS, METHODS, SCORES, Member
from service.protocol import names
from service.protocol.info import param_info
from service.protocol.request import DEFAULT_PREDICT_TOP_K
from service.runtime.artifacts import ModelBundle
from service.serving import codec
from service.serving.jobs import Job
from service.serving.plan import Work


class Replies:
    """Builds the reply messages of one model."""

    def __init__(self, bundle: ModelBundle) -> None:
        self.bundle = bundle
        self.labels = bundle.meta.labels
        self.model_ref = pb.ModelRef(name=bundle.meta.name, version=bundle.meta.version)

    def prediction(self, job: Job, top_k: int) -> pb.PredictResponse:
        """The ``top_k`` most probable classes (at least 1, at most every label)."""
        if job.error is not None or job.probabilities is None:
            return pb.PredictResponse(model=self.model_ref, error=job.error)
        k = min(max(top_k, 1), len(self.labels))
        order = np.argsort(-job.probabilities, kind="stable")[:k]
        return pb.PredictResponse(
            model=self.model_ref,
            predictions=[
                pb.Prediction(
                    index=int(i), label=self.labels[i], probability=float(job.probabilities[i])
                )
                for i in order
            ],
            timings=timings(job.timings),
        )

    def explain_prediction(self, job: Job) -> pb.PredictResponse:
        """What ``Explain`` lists: at least the default number of predictions."""
        top_k = job.query.top_k if job.query is not None else 0
        return self.prediction(job, max(top_k, DEFAULT_PREDICT_TOP_K))

    def explanation(
        self, job: Job, work: Work, saliency: np.ndarray, seconds: float
    ) -> pb.Explanation:
        """The map at the client's resolution, its mask and box, encoded."""
        assert job.pixels is not None and job.plan is not None and job.query is not None
        height, width = job.pixels.shape[:2]
        start = time.perf_counter()
        full = codec.resize_map(saliency, height, width)
        mask_spec, mask_params = job.plan.mask
        mask = mask_spec.fn(job.pixels, full, **mask_params)
        box = largest_component_box(mask) if mask is not None else None
        job.add_time("mask", time.perf_counter() - start)
        start = time.perf_counter()
        explanation = pb.Explanation(
            method=names.METHODS.number(work.spec.name),  # type: ignore[arg-type]
            target=work.target,
            target_label=self.labels[work.target],
            map=codec.encode_map(full, job.query.map_encoding),
            params=work.params.wire(),
            seconds=seconds,
        )
        if mask is not None:
            explanation.mask.CopyFrom(codec.encode_mask(mask, mask_spec.name))
        if box is not None:
            explanation.box.CopyFrom(
                pb.Box(x_min=box.x_min, y_min=box.y_min, x_max=box.x_max, y_max=box.y_max)
            )
        job.add_time("encode", time.perf_counter() - start)
        return explanation

    def refinement(
        self, job: Job, work: Work, saliency: np.ndarray, forwards: int
    ) -> pb.Refinement:
        """An anytime map, resized and encoded as :meth:`explanation` will do its map."""
        assert job.pixels is not None and job.query is not None
        height, width = job.pixels.shape[:2]
        full = codec.resize_map(saliency, height, width)
        return pb.Refinement(
            method=names.METHODS.number(work.spec.name),  # type: ignore[arg-type]
            target=work.target,
            params=work.params.wire(),
            map=codec.encode_map(full, job.query.map_encoding),
            forwards=forwards,
            forwards_total=work.spec.cost(work.params, self.bundle.meta.input_size).forwards,
        )

    def response(self, job: Job) -> pb.ExplainResponse:
        """The complete reply of a job, or its error."""
        if job.error is not None:
            return pb.ExplainResponse(model=self.model_ref, error=job.error)
        job.timings["total"] = time.perf_counter() - job.started
        return pb.ExplainResponse(
            model=self.model_ref,
            predictions=self.explain_prediction(job).predictions,
            explanations=job.explanations,
            timings=timings(job.timings),
        )

    def model_info(self) -> pb.ModelInfo:
        """Labels, input size, and every method, mask and score with its parameters."""
        meta, engine = self.bundle.meta, self.bundle.engine
        channels, height, width = meta.input_size
        methods = []
        for spec in METHODS.members():
            reason = engine.unavailable_reason(spec)
            methods.append(
                pb.MethodInfo(
                    method=names.METHODS.number(spec.name),  # type: ignore[arg-type]
                    **_described(spec),
                    needs_gradients=spec.needs_gradients,
                    batchable=spec.batchable,
                    defaults=spec.defaults.wire(),
                    available=reason is None,
                    reason=reason or "",
                )
            )
        masks = [
            pb.MaskInfo(kind=names.MASKS.number(spec.name), **_described(spec))  # type: ignore[arg-type]
            for spec in MASKS.members()
        ]
        scores = [
            pb.ScoreInfo(
                score=names.SCORES.number(spec.name),  # type: ignore[arg-type]
                higher_is_better=spec.higher_is_better,
                **_described(spec),
            )
            for spec in SCORES.members()
        ]
        return pb.ModelInfo(
            model=self.model_ref,
            labels=meta.labels,
            channels=channels,
            height=height,
            width=width,
            mean=meta.mean,
            std=meta.std,
            target_layer=engine.target_layer_name or "",
            cam_layer=_cam_layer_info(engine.cam_layer),
            attention=engine.attention.how if engine.attention else "",
            methods=methods,
            masks=masks,
            scores=scores,
        )


def _cam_layer_info(layer: CamLayer | None) -> pb.CamLayerInfo | None:
    if layer is None:
        return None
    return pb.CamLayerInfo(
        name=layer.name,
        kind=layer.kind,
        grid_height=layer.grid[0],
        grid_width=layer.grid[1],
        prefix_tokens=layer.prefix_tokens,
        chosen=layer.chosen,
        how=layer.how,
    )


def _described(member: Member) -> dict[str, Any]:
    """The fields every ``*Info`` message shares."""
    return {
        "name": member.name,
        "description": member.description,
        "paper": member.paper,
        "params": [param_info(p) for p in member.params],
    }


def timings(values: dict[str, float]) -> list[pb.StageTiming]:
    return [pb.StageTiming(stage=k, seconds=v) for k, v in values.items()]
