"""The protocol's replies -> JSON, for the HTTP front.

Registry names for enum numbers (``"grad_cam"``, not ``METHOD_GRAD_CAM``), maps and masks
as ``{"b64": ...}`` PNGs with their value range, timings as ``{stage: seconds}``.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message

from service._proto.saliency.v1 import saliency_pb2 as pb
from service.protocol.families import DEFAULT_METHOD
from service.protocol.names import MAP_ENCODINGS, MASKS, METHODS, SCORES
from service.protocol.request import DEFAULT_TOP_K


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _model(ref: pb.ModelRef) -> dict[str, str]:
    return {"name": ref.name, "version": ref.version}


def _classes(predictions: Any) -> list[dict[str, Any]]:
    return [{"index": p.index, "label": p.label, "probability": p.probability} for p in predictions]


def _timings(timings: Any) -> dict[str, float]:
    return {t.stage: t.seconds for t in timings}


def _scores(scores: Any) -> dict[str, float]:
    return {SCORES.label(s.score): s.value for s in scores}


def _box(box: pb.Box) -> dict[str, int]:
    return {"x_min": box.x_min, "y_min": box.y_min, "x_max": box.x_max, "y_max": box.y_max}


def _map(saliency: pb.SaliencyMap) -> dict[str, Any]:
    return {
        "encoding": MAP_ENCODINGS.name(saliency.encoding),
        "width": saliency.width,
        "height": saliency.height,
        "value_min": saliency.value_min,
        "value_max": saliency.value_max,
        "b64": _b64(saliency.data),
    }


def explanation_json(item: pb.Explanation) -> dict[str, Any]:
    """One map with its mask, box, scores, parameters and time."""
    return {
        "method": METHODS.label(item.method),
        "target": item.target,
        "target_label": item.target_label,
        "map": _map(item.map),
        "mask": (
            {
                "kind": MASKS.label(item.mask.kind),
                "width": item.mask.width,
                "height": item.mask.height,
                "b64": _b64(item.mask.png),
            }
            if item.mask.png
            else None
        ),
        "box": _box(item.box) if item.HasField("box") else None,
        "completeness_error": (
            item.completeness_error if item.HasField("completeness_error") else None
        ),
        "scores": _scores(item.scores),
        "params": dict(item.params),
        "seconds": item.seconds,
    }


def refinement_json(item: pb.Refinement) -> dict[str, Any]:
    """An anytime map: the explanation it will become (method, target, params), the map
    so far as an explanation's, and the forwards it cost of the method's ceiling."""
    return {
        "method": METHODS.label(item.method),
        "target": item.target,
        "params": dict(item.params),
        "map": _map(item.map),
        "forwards": item.forwards,
        "forwards_total": item.forwards_total,
    }


def explain_json(reply: pb.ExplainResponse) -> dict[str, Any]:
    """One instance's explanations."""
    return {
        "model": _model(reply.model),
        "classes": _classes(reply.predictions),
        "explanations": [explanation_json(e) for e in reply.explanations],
        "timings": _timings(reply.timings),
    }


def predict_json(reply: pb.PredictResponse) -> dict[str, Any]:
    """One instance's top-k classes."""
    return {
        "model": _model(reply.model),
        "classes": _classes(reply.predictions),
        "timings": _timings(reply.timings),
    }


def scores_json(update: pb.ScoreUpdate) -> dict[str, Any]:
    return {"explanation_index": update.explanation_index, "scores": _scores(update.scores)}


def generic_json(message: Message) -> dict[str, Any]:
    """Any message as JSON (a stream part kind this module does not know yet)."""
    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def _params(params: Any) -> list[dict[str, Any]]:
    return [generic_json(p) for p in params]


def models_json(listing: pb.ListModelsResponse) -> dict[str, Any]:
    """``GET /v1/models``: KServe's ``models`` (the names), the default model's name, and
    what ``ListModels`` says of each (version, input, labels count, methods it can run)."""
    return {
        "models": [m.name for m in listing.models],
        "default": next((m.name for m in listing.models if m.default), None),
        "details": [
            {
                "name": m.name,
                "default": m.default,
                "ready": m.serving,
                "version": m.version,
                "input": {"channels": m.channels, "height": m.height, "width": m.width},
                "labels_count": m.labels_count,
                "target_layer": m.target_layer,
                "methods": [METHODS.label(number) for number in m.methods],
            }
            for m in listing.models
        ],
    }


def model_json(info: pb.ModelInfo) -> dict[str, Any]:
    """``GET /v1/models/{m}``: KServe's ``name`` and ``ready``, and what the model can do,
    from the registries (the page builds its choices from this, never from a list)."""
    return {
        "name": info.model.name,
        "version": info.model.version,
        "ready": True,
        "labels": list(info.labels),
        "input": {"channels": info.channels, "height": info.height, "width": info.width},
        "target_layer": info.target_layer,
        "methods": [
            {
                "name": m.name,
                "description": m.description,
                "paper": m.paper,
                "needs_gradients": m.needs_gradients,
                "available": m.available,
                "params": _params(m.params),
            }
            for m in info.methods
        ],
        "masks": [
            {"name": m.name, "description": m.description, "params": _params(m.params)}
            for m in info.masks
        ],
        "scores": [
            {
                "name": s.name,
                "description": s.description,
                "higher_is_better": s.higher_is_better,
                "params": _params(s.params),
            }
            for s in info.scores
        ],
        "defaults": {
            "method": DEFAULT_METHOD,
            "mask": MASKS.name(0),
            "map_encoding": MAP_ENCODINGS.name(0),
            "top_k": DEFAULT_TOP_K,
        },
    }


PartEncoder = Callable[[Any], dict[str, Any]]
PART_ENCODERS: dict[str, PartEncoder] = {
    "prediction": predict_json,
    "refinement": refinement_json,
    "explanation": explanation_json,
    "scores": scores_json,
    "summary": explain_json,
}
"""``ExplainStreamResponse.part`` field -> its JSON; other fields go through
:func:`generic_json` under their own name."""


def stream_part_json(part: pb.ExplainStreamResponse) -> tuple[str, dict[str, Any]]:
    """The SSE event name (the part's oneof field) and its data."""
    name = part.WhichOneof("part") or "empty"
    if name == "empty":
        return name, {}
    message = getattr(part, name)
    return name, PART_ENCODERS.get(name, generic_json)(message)
