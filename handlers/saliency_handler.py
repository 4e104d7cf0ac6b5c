"""TorchServe handler: decode a batch, delegate to ``service.serving``, encode replies.

Inputs (one key per request; TorchServe gRPC ``input`` map or HTTP form fields):
    request      serialized ``saliency.v1.ExplainRequest`` -> serialized ``ExplainResponse``
                 (with ``stream`` = "true" on ``StreamPredictions``: serialized
                 ``ExplainStreamResponse`` parts, the prediction first)
    predict      serialized ``PredictRequest`` -> serialized ``PredictResponse``
    model_info   anything -> serialized ``ModelInfo``
    data / body  image bytes -> JSON: predictions, base64 PNG maps and masks; optional keys
                 ``methods`` (comma-separated registry names), ``top_k``, ``mask``
    deadline_unix_ms  optional absolute deadline; work stops there (DEADLINE_EXCEEDED)
    request_id   optional uuid4 hex; once the gateway marks it cancelled, work stops

TorchServe fails a whole batch or none of it, so a per-request error travels in the reply
(``error`` field, or ``{"error": ...}`` in JSON) and the gateway turns it into a status.
"""

from __future__ import annotations

import json
import logging
import os
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from google.protobuf import json_format

from service._proto.saliency.v1 import saliency_pb2 as pb
from service.protocol.errors import EngineError, InvalidInputError, code_name
from service.protocol.limits import Limits
from service.runtime.artifacts import load_bundle
from service.runtime.onnx_forward import cpu_quota
from service.serving.cancel import CancelBoard
from service.serving.pipeline import Event, Explainer, Job, method_enum

logger = logging.getLogger(__name__)
_JSON_MASKS = {
    "none": pb.MASK_KIND_NONE,
    "threshold": pb.MASK_KIND_THRESHOLD,
    "grabcut": pb.MASK_KIND_GRABCUT,
}


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


class SaliencyHandler:
    """Entry point TorchServe instantiates once per worker."""

    def __init__(self) -> None:
        self.explainer: Explainer | None = None
        self.cancels = CancelBoard()
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
        self.explainer = Explainer(bundle, Limits.from_env())
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

    def handle(self, data: list[dict[str, Any]], context: Any) -> list[bytes | str]:
        assert self.explainer is not None, "initialize() was not called"
        replies: list[bytes | str | None] = [None] * len(data)
        explain: list[tuple[int, Job, bool]] = []
        predicts: list[tuple[int, pb.PredictRequest]] = []
        for index, item in enumerate(data):
            try:
                kind, message, stream = self._parse(item)
            except EngineError as exc:
                replies[index] = _error_reply(item, exc)
                continue
            if kind == "model_info":
                replies[index] = self.explainer.model_info().SerializeToString()
            elif kind == "predict":
                predicts.append((index, message))  # type: ignore[arg-type]
            else:
                job = Job(
                    request=message,  # type: ignore[arg-type]
                    deadline=_deadline(item),
                    cancelled=self._cancelled(item),
                )
                explain.append((index, job, stream))
        if predicts:
            for (index, _), response in zip(
                predicts, self.explainer.predict_batch([m for _, m in predicts]), strict=True
            ):
                replies[index] = response.SerializeToString()
        if explain:
            self._explain(data, explain, replies, context)
        return [r if r is not None else b"" for r in replies]

    def _cancelled(self, item: dict[str, Any]) -> Callable[[], bool] | None:
        request_id = _text(item.get("request_id"))
        if not request_id:
            return None
        return lambda: self.cancels.is_cancelled(request_id)

    def _parse(self, item: dict[str, Any]) -> tuple[str, Any, bool]:
        stream = _text(item.get("stream")) == "true"
        try:
            if "request" in item:
                return "explain", pb.ExplainRequest.FromString(_bytes(item["request"])), stream
            if "predict" in item:
                return "predict", pb.PredictRequest.FromString(_bytes(item["predict"])), False
        except Exception as exc:  # protobuf raises DecodeError (not a public class)
            raise InvalidInputError(
                f"input is not a serialized saliency.v1 message: {exc}"
            ) from None
        if "model_info" in item:
            return "model_info", None, False
        image = item.get("data", item.get("body"))
        if image is None:
            raise InvalidInputError(
                "no input: send 'request' (ExplainRequest), 'predict', 'model_info' or 'data' "
                "(image bytes)"
            )
        return "explain", _json_request(item, _bytes(image)), stream

    def _explain(
        self,
        data: list[dict[str, Any]],
        explain: list[tuple[int, Job, bool]],
        replies: list[bytes | str | None],
        context: Any,
    ) -> None:
        assert self.explainer is not None
        where = {id(job): (index, stream) for index, job, stream in explain}
        try:
            events = list(self._events([job for _, job, _ in explain], where, context))
        except Exception as exc:  # a bug must not take the other requests' replies with it
            logger.error("explain batch failed: %s", traceback.format_exc())
            for index, _, _ in explain:
                replies[index] = _error_reply(data[index], exc)
            return
        for event in events:
            index, stream = where[id(event.job)]
            response: pb.ExplainResponse = event.message  # type: ignore[assignment]
            if stream:
                del response.explanations[:]  # already sent one by one
                replies[index] = pb.ExplainStreamResponse(summary=response).SerializeToString()
            elif "request" in data[index]:
                replies[index] = response.SerializeToString()
            else:
                replies[index] = json.dumps(
                    json_format.MessageToDict(response, preserving_proto_field_name=True)
                )

    def _events(self, jobs: list[Job], where: dict[int, tuple[int, bool]], context: Any):  # type: ignore[no-untyped-def]
        assert self.explainer is not None
        for event in self.explainer.run(jobs):
            index, stream = where[id(event.job)]
            if event.kind == "done":
                yield event
            elif stream:
                _send_part(context, index, _stream_part(event))


def _stream_part(event: Event) -> pb.ExplainStreamResponse:
    if event.kind == "prediction":
        return pb.ExplainStreamResponse(prediction=event.message)  # type: ignore[arg-type]
    if event.kind == "explanation":
        return pb.ExplainStreamResponse(explanation=event.message)  # type: ignore[arg-type]
    return pb.ExplainStreamResponse(scores=event.message)  # type: ignore[arg-type]


def _send_part(context: Any, index: int, part: pb.ExplainStreamResponse) -> None:
    # Addressed to this request only: other requests of the batch may be unary calls,
    # which TorchServe would complete on the first message they receive.
    from ts.handler_utils.utils import send_intermediate_predict_response

    send_intermediate_predict_response(
        {index: part.SerializeToString()},
        {index: context.request_ids[index]},
        "Intermediate Prediction success",
        200,
        context,
    )


def _json_request(item: dict[str, Any], image: bytes) -> pb.ExplainRequest:
    request = pb.ExplainRequest(image=pb.Image(encoded=image))
    names = [n.strip() for n in (_text(item.get("methods")) or "").split(",") if n.strip()]
    try:
        request.methods.extend(pb.MethodRequest(method=method_enum(n)) for n in names)
    except ValueError:
        raise InvalidInputError(f"unknown method in {names}") from None
    top_k = _text(item.get("top_k"))
    if top_k:
        if not top_k.isdigit():
            raise InvalidInputError(f"top_k must be a whole number, got {top_k!r}")
        request.top_k = int(top_k)
    mask = _text(item.get("mask"))
    if mask:
        if mask not in _JSON_MASKS:
            raise InvalidInputError(f"mask must be one of {sorted(_JSON_MASKS)}, got {mask!r}")
        request.mask.kind = _JSON_MASKS[mask]
    return request


def _error_reply(item: dict[str, Any], exc: BaseException) -> bytes | str:
    error = pb.Error(code=code_name(exc), message=str(exc) or type(exc).__name__)
    if "predict" in item:
        return pb.PredictResponse(error=error).SerializeToString()
    if "model_info" in item:
        return pb.ModelInfo(error=error).SerializeToString()
    if "request" in item:
        response = pb.ExplainResponse(error=error)
        if _text(item.get("stream")) == "true":
            return pb.ExplainStreamResponse(summary=response).SerializeToString()
        return response.SerializeToString()
    return json.dumps({"error": {"code": error.code, "message": error.message}})


def _deadline(item: dict[str, Any]) -> float | None:
    """Absolute wall-clock deadline (sent by the gateway) as a ``time.monotonic()`` value."""
    raw = _text(item.get("deadline_unix_ms"))
    if not raw:
        return None
    return time.monotonic() + (float(raw) / 1000.0 - time.time())


def _bytes(value: Any) -> bytes:
    if isinstance(value, str):
        return value.encode()
    return bytes(value)


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, (bytes, bytearray)) else str(value)
