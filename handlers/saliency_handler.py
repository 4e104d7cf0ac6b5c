"""TorchServe handler: decode a batch, delegate to ``service.serving``, encode replies.

Inputs (one key per request; TorchServe gRPC ``input`` map or HTTP form fields):
    request      serialized ``saliency.v1.ExplainRequest`` -> serialized ``ExplainResponse``
                 (with ``stream`` = "true" on ``StreamPredictions``: serialized
                 ``ExplainStreamResponse`` parts, the prediction first)
    predict      serialized ``PredictRequest`` -> serialized ``PredictResponse``
    model_info   anything -> serialized ``ModelInfo``
    visualize    serialized ``VisualizeClassRequest`` -> serialized ``VisualizeClassResponse``
                 (with ``stream`` = "true": ``VisualizeClassStreamResponse`` parts, the
                 progress first, the result last)
    concepts     serialized ``GetConceptsRequest`` -> serialized ``GetConceptsResponse``
    data / body  image bytes -> JSON: predictions, base64 PNG maps and masks; optional keys
                 ``methods`` (comma-separated registry names), ``top_k``, ``mask``
    stream       "true" on ``StreamPredictions``; "false" says the call is unary, and lets
                 the reply go as soon as it is ready (see :mod:`handlers.outbox`)
    deadline_unix_ms  optional absolute deadline; work stops there (DEADLINE_EXCEEDED)
    request_id   optional uuid4 hex; once the gateway marks it cancelled, work stops

TorchServe fails a whole batch or none of it, so a per-request error travels in the reply
(``error`` field, or ``{"error": ...}`` in JSON) and the gateway turns it into a status.

Replies leave through :class:`handlers.outbox.Outbox`, which writes them only in the
sequences TorchServe 0.12's frontend survives (its docstring says which and why): a
unary gRPC request's reply goes as soon as it is ready -- a refused request or a Predict
never waits for the batch's slow explanations -- and no reply is written while a
caller's deadline closes its call. Every explanation has a deadline: the caller's, or
``Limits.default_deadline_s`` when it sent none, and never later than what TorchServe's
``responseTimeout`` allows (a batch that outlives it kills the worker).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from google.protobuf import json_format

from handlers import inputs
from handlers.outbox import Outbox, Reply, Slot
from service._proto.saliency.v1 import saliency_pb2 as pb
from service.protocol.errors import INTERNAL_MESSAGE
from service.protocol.events import EventKind, stream_part
from service.protocol.limits import Limits
from service.runtime.artifacts import load_bundle
from service.runtime.onnx_forward import cpu_quota
from service.serving.cancel import CancelBoard
from service.serving.pipeline import Event, Explainer, Job
from service.serving.refine import Refinements
from service.serving.visualize import Visualizer

__all__ = ["INTERNAL_MESSAGE", "SaliencyHandler"]
logger = logging.getLogger(__name__)
TORCHSERVE_RESPONSE_TIMEOUT_S = 120  # TorchServe's default ``responseTimeout``


def worker_threads(model_config: dict[str, Any]) -> int:
    """Threads for torch and ONNX Runtime in one worker.

    ``handler.threads`` of the archive's ``model-config.yaml`` when set, else the
    container's CPU quota split evenly among the model's workers: workers that each
    assumed every core would oversubscribe the CPU they share.
    """
    handler = model_config.get("handler") or {}
    threads = int(handler.get("threads") or 0)
    if threads > 0:
        return threads
    workers = int(model_config.get("minWorkers") or 1)
    return max(1, cpu_quota() // max(1, workers))


def worker_precision(model_config: dict[str, Any]) -> str:
    """``$SALIENCY_PRECISION`` if set (a deployment's choice), else ``handler.precision``."""
    handler = model_config.get("handler") or {}
    return os.environ.get("SALIENCY_PRECISION") or str(handler.get("precision") or "float32")


def longest_work_s(model_config: dict[str, Any]) -> float:
    """How long a batch's work may run: TorchServe kills a worker whose batch outlives
    ``responseTimeout``, so work stops well before -- 20 s before, or at half of it --
    leaving the last chunk and the replies time to finish."""
    timeout = float(model_config.get("responseTimeout") or TORCHSERVE_RESPONSE_TIMEOUT_S)
    return max(0.5 * timeout, timeout - 20.0)


class SaliencyHandler:
    """Entry point TorchServe instantiates once per worker."""

    def __init__(self) -> None:
        self.explainer: Explainer | None = None
        self.visualizer: Visualizer | None = None
        self.cancels = CancelBoard()
        self.longest_work_s = longest_work_s({})
        self.initialized = False

    def initialize(self, context: Any) -> None:
        props = context.system_properties
        gpu_id = props.get("gpu_id")
        import torch

        device = "cpu"
        if gpu_id is not None and torch.cuda.is_available():
            device = f"cuda:{gpu_id}"
        model_config = getattr(context, "model_yaml_config", None) or {}
        threads = worker_threads(model_config)
        torch.set_num_threads(threads)
        bundle = load_bundle(
            Path(props["model_dir"]),
            device=device,
            intra_op_threads=threads,
            precision=worker_precision(model_config),
        )
        limits = Limits.from_env()
        self.explainer = Explainer(bundle, limits, concepts_in=Path(props["model_dir"]))
        self.visualizer = Visualizer(bundle, limits)
        self.longest_work_s = longest_work_s(model_config)
        self.initialized = True
        logger.info(
            "saliency handler ready: %s %s on %s, %d threads, %s, %d rows per pass",
            bundle.meta.name,
            bundle.meta.version,
            device,
            threads,
            bundle.engine.precision,
            bundle.engine.chunk_size,
        )

    def handle(self, data: list[dict[str, Any]], context: Any) -> list[Reply]:
        """One reply per item; an item's failure, whatever it is, fails that item only."""
        assert self.explainer is not None, "initialize() was not called"
        start = time.monotonic()
        slots = [self._slot(index, item, context) for index, item in enumerate(data)]
        outbox = Outbox(context, slots, _send_intermediate)
        replies: list[Reply | None] = [None] * len(data)
        explain: list[tuple[int, Job]] = []
        predicts: list[tuple[int, pb.PredictRequest]] = []
        visuals: list[tuple[int, pb.VisualizeClassRequest]] = []
        for index, item in enumerate(data):
            try:
                slots[index].deadline = inputs.deadline(item)
                kind, message = inputs.parse(item)
                if kind == "model_info":
                    replies[index] = self.explainer.model_info().SerializeToString()
                elif kind == "concepts":
                    replies[index] = self.explainer.concepts.catalog(message).SerializeToString()
                elif kind == "predict":
                    predicts.append((index, message))
                elif kind == "visualize":
                    visuals.append((index, message))
                else:
                    deadline = self._work_deadline(slots[index].deadline, start)
                    job = Job(message, deadline, slots[index].cancelled)
                    if slots[index].stream:
                        job.refinements = _refinements(outbox, index)
                    explain.append((index, job))
            except Exception as exc:
                replies[index] = inputs.error_reply(item, exc)
        if predicts:
            self._predict(data, predicts, replies)
        if explain:  # slow work follows: what is ready goes now
            self._send_ready(replies, outbox)
            self._explain(data, explain, replies, outbox)
        if visuals:
            self._send_ready(replies, outbox)
            self._visualize(data, visuals, replies, outbox, start)
        return outbox.final(replies)

    @staticmethod
    def _send_ready(replies: list[Reply | None], outbox: Outbox) -> None:
        for index, reply in enumerate(replies):
            if reply is not None and outbox.early(index, reply):
                replies[index] = None

    def _slot(self, index: int, item: dict[str, Any], context: Any) -> Slot:
        request_id = inputs.text(item.get("request_id"))
        cancelled = (lambda: self.cancels.is_cancelled(request_id)) if request_id else _never
        flag = inputs.text(item.get("stream"))
        grpc = not inputs.over_http(context, index)
        return Slot(index, grpc, flag == "true", flag == "false", cancelled=cancelled)

    def _work_deadline(self, caller: float | None, start: float) -> float:
        """The caller's deadline, else the default one; never past the batch's limit."""
        assert self.explainer is not None
        latest = start + self.longest_work_s
        if caller is None:
            return min(start + self.explainer.limits.default_deadline_s, latest)
        return min(caller, latest)

    def _predict(
        self,
        data: list[dict[str, Any]],
        predicts: list[tuple[int, pb.PredictRequest]],
        replies: list[Reply | None],
    ) -> None:
        assert self.explainer is not None
        try:
            responses = self.explainer.predict_batch([message for _, message in predicts])
        except Exception as exc:  # a bug must not take the other requests' replies with it
            for index, _ in predicts:
                replies[index] = inputs.error_reply(data[index], exc)
            return
        for (index, _), response in zip(predicts, responses, strict=True):
            replies[index] = response.SerializeToString()

    def _explain(
        self,
        data: list[dict[str, Any]],
        explain: list[tuple[int, Job]],
        replies: list[Reply | None],
        outbox: Outbox,
    ) -> None:
        """Run the jobs; parts go to streams at once, each reply as soon as it may."""
        assert self.explainer is not None
        where = {id(job): index for index, job in explain}
        left = len(explain)
        try:
            for event in self.explainer.run([job for _, job in explain]):
                index = where[id(event.job)]
                if event.kind is not EventKind.DONE:
                    if outbox.slots[index].stream:
                        outbox.part(index, stream_part(event.kind, event.message))
                    continue
                left -= 1
                reply = self._reply(data[index], outbox, index, event.message)  # type: ignore[arg-type]
                if not (left and outbox.early(index, reply)):
                    replies[index] = reply
        except Exception as exc:  # a bug must not take the other requests' replies with it
            for index, _ in explain:
                if replies[index] is None and not outbox.slots[index].gone:
                    replies[index] = inputs.error_reply(data[index], exc)

    def _visualize(
        self,
        data: list[dict[str, Any]],
        visuals: list[tuple[int, pb.VisualizeClassRequest]],
        replies: list[Reply | None],
        outbox: Outbox,
        start: float,
    ) -> None:
        """One search after the other, each under its own deadline; progress to streams."""
        assert self.visualizer is not None
        for position, (index, request) in enumerate(visuals):
            left = len(visuals) - position - 1
            slot = outbox.slots[index]
            progress = None
            if slot.stream:
                progress = functools.partial(_progress_part, outbox, index)
            try:
                response = self.visualizer.visualize(
                    request,
                    deadline=self._work_deadline(slot.deadline, start),
                    cancelled=slot.cancelled,
                    progress=progress,
                )
                reply: Reply = inputs.visualize_reply(data[index], response)
            except Exception as exc:  # fails this request only
                reply = inputs.error_reply(data[index], exc)
            if not (left and outbox.early(index, reply)):
                replies[index] = reply

    @staticmethod
    def _reply(
        item: dict[str, Any], outbox: Outbox, index: int, response: pb.ExplainResponse
    ) -> Reply:
        if outbox.slots[index].stream:
            return outbox.summary(index, response)
        if "request" in item:
            return response.SerializeToString()
        return json.dumps(json_format.MessageToDict(response, preserving_proto_field_name=True))


def _refinements(outbox: Outbox, index: int) -> Refinements:
    """A stream's anytime maps: each a part of its own, never repeated by the summary."""

    def send(event: Event) -> None:
        outbox.progress(index, stream_part(event.kind, event.message).SerializeToString())

    return Refinements(send=send, open=functools.partial(outbox.open, index))


def _progress_part(outbox: Outbox, index: int, progress: pb.VisualizeClassProgress) -> None:
    outbox.progress(index, pb.VisualizeClassStreamResponse(progress=progress).SerializeToString())


def _never() -> bool:
    return False


def _send_intermediate(
    ret: dict[int, Reply], ids: dict[int, str], message: str, code: int, context: Any
) -> None:
    from ts.handler_utils.utils import send_intermediate_predict_response

    send_intermediate_predict_response(ret, ids, message, code, context)
