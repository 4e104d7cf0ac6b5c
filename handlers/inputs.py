"""A batch item as TorchServe hands it to the handler: its inputs parsed, its errors as
replies in the form the item asked for (protobuf, stream part or JSON)."""

from __future__ import annotations

import json
import logging
import math
import time
from typing import Any

from handlers.outbox import Reply
from service._proto.saliency.v1 import saliency_pb2 as pb
from service.protocol.errors import EngineError, InvalidInputError, clip, code_name, public_message
from service.protocol.events import EventKind, stream_part
from service.protocol.families import DEFAULT_MASK, DEFAULT_METHOD
from service.protocol.request import ExplainQuery, MaskCall, MethodCall

logger = logging.getLogger(__name__)


def over_http(context: Any, index: int) -> bool:
    """HTTP requests reach the worker with their HTTP headers (strings); gRPC ones with
    only each input's content type (a dict)."""
    try:
        properties = context.request_processor[index].get_request_properties()
    except (AttributeError, IndexError, KeyError, TypeError):
        return False
    return any(isinstance(value, str) for value in properties.values())


def parse(item: dict[str, Any]) -> tuple[str, Any]:
    """``("explain", ExplainRequest)``, ``("predict", PredictRequest)``,
    ``("visualize", VisualizeClassRequest)``, ``("concepts", GetConceptsRequest)`` or
    ``("model_info", None)``; INVALID_ARGUMENT
    for bytes that are not the message."""
    for key, kind, message in (
        ("request", "explain", pb.ExplainRequest),
        ("predict", "predict", pb.PredictRequest),
        ("visualize", "visualize", pb.VisualizeClassRequest),
        ("concepts", "concepts", pb.GetConceptsRequest),
    ):
        if key in item:
            try:
                return kind, message.FromString(_bytes(item[key]))
            except Exception:  # protobuf's DecodeError: its text is no help to a caller
                raise InvalidInputError(
                    f"input {key!r} is not a serialized saliency.v1 message"
                ) from None
    if "model_info" in item:
        return "model_info", None
    image = item.get("data", item.get("body"))
    if image is None:
        raise InvalidInputError(
            "no input: send 'request' (ExplainRequest), 'predict', 'visualize', 'concepts', "
            "'model_info' or 'data' (image bytes)"
        )
    return "explain", _json_request(item, _bytes(image))


def _json_request(item: dict[str, Any], image: bytes) -> pb.ExplainRequest:
    """The ``data`` path's form fields as a request, with the protocol's names."""
    names = [n.strip() for n in (text(item.get("methods")) or "").split(",") if n.strip()]
    top_k = text(item.get("top_k")) or "1"
    if not top_k.isdigit():
        raise InvalidInputError(f"top_k must be a whole number, got {clip(top_k)}")
    methods = tuple(MethodCall(name) for name in names) or (MethodCall(DEFAULT_METHOD),)
    mask = MaskCall(text(item.get("mask")) or DEFAULT_MASK)
    query = ExplainQuery(pb.Image(encoded=image), top_k=int(top_k), methods=methods, mask=mask)
    return query.to_pb()


def error_reply(item: dict[str, Any], exc: BaseException) -> Reply:
    """The reply that carries one item's error, in the form its input asked for."""
    if not isinstance(exc, EngineError):
        logger.error("request failed", exc_info=exc)
    error = pb.Error(code=code_name(exc), message=public_message(exc))
    if "predict" in item:
        return pb.PredictResponse(error=error).SerializeToString()
    if "model_info" in item:
        return pb.ModelInfo(error=error).SerializeToString()
    if "visualize" in item:
        return visualize_reply(item, pb.VisualizeClassResponse(error=error))
    if "concepts" in item:
        return pb.GetConceptsResponse(error=error).SerializeToString()
    if "request" in item:
        response = pb.ExplainResponse(error=error)
        if text(item.get("stream")) == "true":
            return stream_part(EventKind.DONE, response).SerializeToString()
        return response.SerializeToString()
    return json.dumps({"error": {"code": error.code, "message": error.message}})


def visualize_reply(item: dict[str, Any], response: pb.VisualizeClassResponse) -> bytes:
    """A ``VisualizeClass`` reply: the response, or a stream's last part holding it."""
    if text(item.get("stream")) == "true":
        return pb.VisualizeClassStreamResponse(result=response).SerializeToString()
    return response.SerializeToString()


def deadline(item: dict[str, Any]) -> float | None:
    """Absolute wall-clock deadline (sent by the gateway) as a ``time.monotonic()`` value."""
    raw = text(item.get("deadline_unix_ms"))
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


def text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes | bytearray):
        return value.decode(errors="replace")  # a bad byte is a bad value, not a crash
    return str(value)
