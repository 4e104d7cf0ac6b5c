"""KServe v1 JSON -> the protocol's requests (:mod:`.replies` is the other way).

``{"instances": [{"image": {"b64": "..."}}], "parameters": {...}}`` makes one
``ExplainRequest`` (or ``PredictRequest``) per instance, built through the protocol's
domain types (:class:`~service.protocol.request.ExplainQuery`), so a name is checked
against the wire enums the same way as the client's. Every malformed field is an
``InvalidInputError`` naming the field, with any echoed value clipped.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from typing import Any, TypeVar

from service._proto.saliency.v1 import saliency_pb2 as pb
from service.protocol.errors import InvalidInputError, clip
from service.protocol.families import DEFAULT_METHOD
from service.protocol.names import MAP_ENCODINGS, MASKS
from service.protocol.request import (
    DEFAULT_PREDICT_TOP_K,
    DEFAULT_TOP_K,
    ExplainQuery,
    MaskCall,
    MethodCall,
    PredictQuery,
)

MAX_INSTANCES = 16
"""Images one HTTP call may carry; each is its own call behind, admitted on its own."""
UINT32 = 2**32
UINT64 = 2**64
EXPLAIN_KEYS = ("methods", "top_k", "targets", "mask", "scores", "map_encoding", "seed")
PREDICT_KEYS = ("top_k",)
T = TypeVar("T")


def parse_json(body: bytes) -> Any:
    """The body as JSON: strict (no NaN or Infinity), nesting and numbers bounded."""

    def refuse_constant(name: str) -> None:
        raise ValueError(f"{name} is not JSON")

    try:
        return json.loads(body, parse_constant=refuse_constant)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, huge ints, deep nests
        detail = exc.msg if isinstance(exc, json.JSONDecodeError) else "unreadable"
        raise InvalidInputError(f"the request body is not JSON ({clip(detail)})") from None


def _typed(value: Any, kind: type[T], where: str, what: str) -> T:
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise InvalidInputError(f"{where} must be {what}, got {clip(value)}")
    return value


def _integer(value: Any, where: str, minimum: int, bound: int) -> int:
    number = _typed(value, int, where, "an integer")
    if not minimum <= number < bound:
        raise InvalidInputError(f"{where} must be in [{minimum}, {bound - 1}], got {clip(number)}")
    return number


def _known_keys(mapping: Mapping[str, Any], known: tuple[str, ...], where: str) -> None:
    unknown = sorted(set(mapping) - set(known))
    if unknown:
        raise InvalidInputError(
            f"unknown key {clip(unknown[0])} in {where} (known: {', '.join(known)})"
        )


def _image(instance: Any, index: int) -> pb.Image:
    where = f"instances[{index}]"
    _typed(instance, dict, where, 'an object {"image": {"b64": "..."}}')
    _known_keys(instance, ("image",), where)
    holder = _typed(instance.get("image"), dict, f"{where}.image", 'an object {"b64": "..."}')
    _known_keys(holder, ("b64",), f"{where}.image")
    text = _typed(holder.get("b64"), str, f"{where}.image.b64", "a base64 string")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInputError(
            f"{where}.image.b64 is not base64 (standard alphabet, padded: `base64 -w0`)"
        ) from None
    if not data:
        raise InvalidInputError(f"{where}.image.b64 is empty")
    return pb.Image(encoded=data)


def _instances(body: Any, keys: tuple[str, ...]) -> tuple[list[pb.Image], dict[str, Any]]:
    root = _typed(body, dict, "the request body", 'an object {"instances": [...]}')
    _known_keys(root, ("instances", "parameters"), "the request body")
    instances = _typed(root.get("instances"), list, "instances", "a list of images")
    if not instances:
        raise InvalidInputError('instances is empty: send [{"image": {"b64": "..."}}]')
    if len(instances) > MAX_INSTANCES:
        raise InvalidInputError(
            f"{len(instances)} instances in one call; at most {MAX_INSTANCES}: send several calls"
        )
    parameters = _typed(root.get("parameters", {}), dict, "parameters", "an object")
    _known_keys(parameters, keys, "parameters")
    return [_image(item, i) for i, item in enumerate(instances)], parameters


def _overrides(value: Any, where: str) -> dict[str, object]:
    params = _typed(value, dict, where, "an object of parameter values")
    return params  # values are checked (scalars only) as the request is built


def _named(value: Any, where: str) -> tuple[str, dict[str, object]]:
    """``"name"`` or ``{"name": "...", "params": {...}}``."""
    if isinstance(value, str):
        return value, {}
    entry = _typed(value, dict, where, 'a name or {"name": ..., "params": {...}}')
    _known_keys(entry, ("name", "params"), where)
    name = _typed(entry.get("name"), str, f"{where}.name", "a string")
    return name, _overrides(entry.get("params", {}), f"{where}.params")


def _names(value: Any, where: str) -> list[Any]:
    return _typed(value, list, where, "a list")


def explain_requests(body: Any, model: str) -> list[pb.ExplainRequest]:
    """One ``ExplainRequest`` per instance; ``parameters`` apply to each."""
    images, p = _instances(body, EXPLAIN_KEYS)
    methods = tuple(
        MethodCall(*_named(m, f"parameters.methods[{i}]"))
        for i, m in enumerate(_names(p.get("methods", []), "parameters.methods"))
    )
    mask = MaskCall(*_named(p.get("mask", MASKS.name(0)), "parameters.mask"))
    targets = tuple(
        _integer(t, f"parameters.targets[{i}]", 0, UINT32)
        for i, t in enumerate(_names(p.get("targets", []), "parameters.targets"))
    )
    scores = tuple(
        _typed(s, str, f"parameters.scores[{i}]", "a score name")
        for i, s in enumerate(_names(p.get("scores", []), "parameters.scores"))
    )
    encoding = _typed(
        p.get("map_encoding", MAP_ENCODINGS.name(0)), str, "parameters.map_encoding", "a name"
    )
    top_k = _integer(p.get("top_k", DEFAULT_TOP_K), "parameters.top_k", 1, UINT32)
    seed = _integer(p.get("seed", 0), "parameters.seed", 0, UINT64)
    queries = [
        ExplainQuery(
            image=image,
            model=model,
            top_k=top_k,
            targets=targets,
            methods=methods or (MethodCall(DEFAULT_METHOD),),
            mask=mask,
            scores=scores,
            map_encoding=encoding,
            seed=seed,
        )
        for image in images
    ]
    return [query.to_pb() for query in queries]


def predict_requests(body: Any, model: str) -> list[pb.PredictRequest]:
    """One ``PredictRequest`` per instance."""
    images, p = _instances(body, PREDICT_KEYS)
    top_k = _integer(p.get("top_k", DEFAULT_PREDICT_TOP_K), "parameters.top_k", 1, UINT32)
    return [PredictQuery(image, model, top_k).to_pb() for image in images]
