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
import math
import os
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from google.protobuf import json_format

from service._proto.saliency.v1 import saliency_pb2 as pb
from service.protocol.errors import EngineError, InvalidInputError, clip, code_name, message_of
from service.protocol.events import EventKind, stream_part
from service.protocol.families import DEFAULT_MASK, DEFAULT_METHOD
from service.protocol.limits import Limits
from service.protocol.request import ExplainQuery, MaskCall, MethodCall
from service.runtime.artifacts import load_bundle
from service.runtime.onnx_forward import cpu_quota
from service.serving.cancel import CancelBoard
from service.serving.pipeline import Event, Explainer, Job

logger = logging.getLogger(__name__)
INTERNAL_MESSAGE = "internal error in the model worker (see its log)"


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
        """One reply per item; an item's failure, whatever it is, fails that item only."""
        assert self.explainer is not None, "initialize() was not called"
        replies: list[bytes | str | None] = [None] * len(data)
        explain: list[tuple[int, Job, bool]] = []
        predicts: list[tuple[int, pb.PredictRequest]] = []
        for index, item in enumerate(data):
            try:
                kind, message, stream = self._parse(item)
                if kind == "model_info":
                    replies[index] = self.explainer.model_info().SerializeToString()
                elif kind == "predict":
                    predicts.append((index, message))
                else:
                    job = Job(message, _deadline(item), self._cancelled(item))
                    explain.append((index, job, stream))
            except Exception as exc:
                replies[index] = _error_reply(item, exc)
        if predicts:
            self._predict(data, predicts, replies)
        if explain:
            self._explain(data, explain, replies, context)
        return [r if r is not None else b"" for r in replies]

    def _predict(
        self,
        data: list[dict[str, Any]],
        predicts: list[tuple[int, pb.PredictRequest]],
        replies: list[bytes | str | None],
    ) -> None:
        assert self.explainer is not None
        try:
            responses = self.explainer.predict_batch([message for _, message in predicts])
        except Exception as exc:  # a bug must not take the other requests' replies with it
            for index, _ in predicts:
                replies[index] = _error_reply(data[index], exc)
            return
        for (index, _), response in zip(predicts, responses, strict=True):
            replies[index] = response.SerializeToString()

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
                f"input is not a serialized saliency.v1 message: {clip(str(exc))}"
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
        where = {id(job): (index, stream) for index, job, stream in explain}
        try:
            events = list(self._events([job for _, job, _ in explain], where, context))
        except Exception as exc:  # a bug must not take the other requests' replies with it
            for index, _, _ in explain:
                replies[index] = _error_reply(data[index], exc)
            return
        for event in events:
            index, stream = where[id(event.job)]
            response: pb.ExplainResponse = event.message  # type: ignore[assignment]
            if stream:
                del response.explanations[:]  # already sent one by one
                replies[index] = stream_part(EventKind.DONE, response).SerializeToString()
            elif "request" in data[index]:
                replies[index] = response.SerializeToString()
            else:
                replies[index] = json.dumps(
                    json_format.MessageToDict(response, preserving_proto_field_name=True)
                )

    def _events(
        self, jobs: list[Job], where: dict[int, tuple[int, bool]], context: Any
    ) -> Iterator[Event]:
        """The jobs' final events; the others go out at once to the streaming requests."""
        assert self.explainer is not None
        for event in self.explainer.run(jobs):
            index, stream = where[id(event.job)]
            if event.kind is EventKind.DONE:
                yield event
            elif stream:
                _send_part(context, index, stream_part(event.kind, event.message))


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
    """The ``data`` path's form fields as a request, with the protocol's names."""
    names = [n.strip() for n in (_text(item.get("methods")) or "").split(",") if n.strip()]
    top_k = _text(item.get("top_k")) or "1"
    if not top_k.isdigit():
        raise InvalidInputError(f"top_k must be a whole number, got {clip(top_k)}")
    methods = tuple(MethodCall(name) for name in names) or (MethodCall(DEFAULT_METHOD),)
    mask = MaskCall(_text(item.get("mask")) or DEFAULT_MASK)
    query = ExplainQuery(pb.Image(encoded=image), top_k=int(top_k), methods=methods, mask=mask)
    return query.to_pb()


def _error_reply(item: dict[str, Any], exc: BaseException) -> bytes | str:
    """The reply that carries one item's error, in the form its input asked for."""
    if isinstance(exc, EngineError):
        error = pb.Error(code=code_name(exc), message=message_of(exc))
    else:
        logger.error("request failed: %s", "".join(traceback.format_exception(exc)))
        error = pb.Error(code="INTERNAL", message=INTERNAL_MESSAGE)
    if "predict" in item:
        return pb.PredictResponse(error=error).SerializeToString()
    if "model_info" in item:
        return pb.ModelInfo(error=error).SerializeToString()
    if "request" in item:
        response = pb.ExplainResponse(error=error)
        if _text(item.get("stream")) == "true":
            return stream_part(EventKind.DONE, response).SerializeToString()
        return response.SerializeToString()
    return json.dumps({"error": {"code": error.code, "message": error.message}})


def _deadline(item: dict[str, Any]) -> float | None:
    """Absolute wall-clock deadline (sent by the gateway) as a ``time.monotonic()`` value."""
    raw = _text(item.get("deadline_unix_ms"))
    if not raw:
        return None
    try:
        deadline_ms = float(raw)
    except ValueError:
        deadline_ms = math.nan
    if not math.isfinite(deadline_ms):
        raise InvalidInputError(
            f"deadline_unix_ms must be milliseconds since the epoch, got {clip(raw)}"
        )
    return time.monotonic() + (deadline_ms / 1000.0 - time.time())


def _bytes(value: Any) -> bytes:
    if isinstance(value, str):
        return value.encode()
    return bytes(value)


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes | bytearray):
        return value.decode(errors="replace")  # a bad byte is a bad value, not a crash
    return str(value)
