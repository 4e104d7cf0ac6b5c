"""The TorchServe handler without Java: TorchServe's own ``Context`` and a real tiny bundle.

TorchServe answers a whole batch or none of it, so the handler must turn every item's
failure -- bad bytes, a bad deadline, an unknown method, a bug -- into that item's reply
and leave the other items' replies as if they had been alone.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from ts.context import Context, RequestProcessor

from handlers.saliency_handler import INTERNAL_MESSAGE, SaliencyHandler
from service._proto.saliency.v1 import saliency_pb2 as pb
from service.protocol.events import EventKind, event_kind
from service.protocol.names import METHODS
from tests.serving.test_pipeline import png


class Socket:
    """Where TorchServe's worker writes intermediate (streamed) responses."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def sendall(self, data: bytes) -> None:
        self.sent.append(bytes(data))


def context(model_dir: Path, batch: int) -> Context:
    ctx = Context("tiny", str(model_dir), {}, batch, None, "0.12.0", model_yaml_config={})
    ctx.request_ids = {i: f"request-{i}" for i in range(batch)}
    ctx.request_processor = [RequestProcessor({}) for _ in range(batch)]
    ctx.cl_socket = Socket()  # type: ignore[attr-defined]
    return ctx


@pytest.fixture(scope="module")
def handler(tiny_model_dir: Path) -> Iterator[SaliencyHandler]:
    threads = torch.get_num_threads()  # initialize() sets the worker's thread count
    worker = SaliencyHandler()
    worker.initialize(context(tiny_model_dir, 1))
    yield worker
    torch.set_num_threads(threads)


def explain_item(*methods: str, **extra: object) -> dict[str, Any]:
    request = pb.ExplainRequest(image=pb.Image(encoded=png()), seed=3)
    request.methods.extend(pb.MethodRequest(method=METHODS.number(m)) for m in methods)  # type: ignore[misc]
    return {"request": request.SerializeToString(), **extra}


def run(handler: SaliencyHandler, ctx_dir: Path, items: list[dict[str, Any]]) -> list[Any]:
    return handler.handle(items, context(ctx_dir, len(items)))


def explain_reply(raw: bytes) -> pb.ExplainResponse:
    return pb.ExplainResponse.FromString(raw)


def test_one_bad_item_of_each_kind_fails_alone(
    handler: SaliencyHandler, tiny_model_dir: Path
) -> None:
    unknown_method = pb.ExplainRequest(image=pb.Image(encoded=png()))
    unknown_method.methods.append(pb.MethodRequest(method=999))  # type: ignore[arg-type]
    items = [
        explain_item("vanilla_gradient"),
        {"request": b"\xff\x00 not a protobuf"},
        explain_item("vanilla_gradient", deadline_unix_ms=b"soon"),
        explain_item("vanilla_gradient", deadline_unix_ms=b"nan"),
        {"request": unknown_method.SerializeToString()},
        {"predict": pb.PredictRequest(image=pb.Image(encoded=png()), top_k=2).SerializeToString()},
        {"predict": b"\xff\xff\xff"},
        {"model_info": b""},
        {"data": png(), "methods": b"grad_cam,deconvnet"},
        {"data": png(), "mask": b"grabcut", "top_k": b"2"},
        {"nothing": b""},
        explain_item("grad_cam"),
    ]
    replies = run(handler, tiny_model_dir, items)
    assert len(replies) == len(items)
    first, last = explain_reply(replies[0]), explain_reply(replies[-1])
    assert not first.error.code and len(first.explanations) == 1
    assert not last.error.code and last.explanations[0].method == METHODS.number("grad_cam")
    codes = [explain_reply(replies[i]).error for i in (1, 2, 3, 4)]
    assert [e.code for e in codes] == ["INVALID_ARGUMENT"] * 4
    assert "not a serialized saliency.v1 message" in codes[0].message
    assert "deadline_unix_ms" in codes[1].message and "'soon'" in codes[1].message
    assert "deadline_unix_ms" in codes[2].message
    assert "unknown method number 999" in codes[3].message
    assert [p.label for p in pb.PredictResponse.FromString(replies[5]).predictions][:1]
    assert len(pb.PredictResponse.FromString(replies[5]).predictions) == 2
    assert pb.PredictResponse.FromString(replies[6]).error.code == "INVALID_ARGUMENT"
    assert [m.name for m in pb.ModelInfo.FromString(replies[7]).methods] == sorted(METHODS.names())
    bad_json = json.loads(replies[8])["error"]
    assert (
        bad_json["code"] == "INVALID_ARGUMENT"
        and "unknown method 'deconvnet'" in bad_json["message"]
    )
    assert "vanilla_gradient" in bad_json["message"]  # the known names are listed
    good_json = json.loads(replies[9])
    assert len(good_json["explanations"]) == 2 and good_json["explanations"][0]["mask"]["png"]
    assert json.loads(replies[10])["error"]["code"] == "INVALID_ARGUMENT"
    # The good explanation is what it would have been alone.
    [alone] = run(handler, tiny_model_dir, [explain_item("vanilla_gradient")])
    assert explain_reply(alone).explanations[0].map.data == first.explanations[0].map.data


def test_a_passed_deadline_fails_only_its_item(
    handler: SaliencyHandler, tiny_model_dir: Path
) -> None:
    past = str(int((time.time() - 5) * 1000)).encode()
    future = str(int((time.time() + 600) * 1000)).encode()
    replies = run(
        handler,
        tiny_model_dir,
        [
            explain_item("smoothgrad", deadline_unix_ms=past),
            explain_item("smoothgrad", deadline_unix_ms=future),
        ],
    )
    late, on_time = explain_reply(replies[0]), explain_reply(replies[1])
    assert late.error.code == "DEADLINE_EXCEEDED"
    assert not on_time.error.code and len(on_time.explanations) == 1


def test_stream_parts_go_to_the_streaming_item_only(
    handler: SaliencyHandler, tiny_model_dir: Path
) -> None:
    ctx = context(tiny_model_dir, 2)
    streamed = explain_item("vanilla_gradient", "grad_cam", stream=b"true")
    streamed_request = pb.ExplainRequest.FromString(streamed["request"])
    streamed_request.scores.append(pb.SCORE_DELETION_AUC)
    streamed["request"] = streamed_request.SerializeToString()
    replies = handler.handle([explain_item("vanilla_gradient"), streamed], ctx)
    sent = ctx.cl_socket.sent  # type: ignore[attr-defined]
    assert all(b"request-0" not in message for message in sent)
    parts = [_part(message) for message in sent]
    assert [event_kind(p) for p in parts] == [
        EventKind.PREDICTION,
        EventKind.EXPLANATION,
        EventKind.SCORES,
        EventKind.EXPLANATION,
        EventKind.SCORES,
    ]
    summary = pb.ExplainStreamResponse.FromString(replies[1])
    assert event_kind(summary) is EventKind.DONE
    assert not summary.summary.error.code and not summary.summary.explanations
    assert len(explain_reply(replies[0]).explanations) == 1  # the unary item, untouched


def _part(message: bytes) -> pb.ExplainStreamResponse:
    """The one prediction of a TorchServe intermediate response frame (its wire layout:
    code, message, then per request: id, content type, status, phrase, headers, payload)."""
    offset = 4  # status code

    def chunk() -> bytes:
        nonlocal offset
        size = int.from_bytes(message[offset : offset + 4], "big", signed=True)
        offset += 4
        data = message[offset : offset + size]
        offset += size
        return data

    chunk()  # message
    assert chunk() == b"request-1"  # request id
    chunk()  # content type
    offset += 4  # HTTP status code
    chunk()  # phrase
    headers = int.from_bytes(message[offset : offset + 4], "big")
    offset += 4
    for _ in range(2 * headers):
        chunk()
    part = pb.ExplainStreamResponse.FromString(chunk())
    assert int.from_bytes(message[offset : offset + 4], "big", signed=True) == -1
    return part


def test_a_bug_fails_its_items_with_a_generic_internal_error(
    handler: SaliencyHandler, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert handler.explainer is not None

    def broken(jobs: object) -> Iterator[object]:
        raise RuntimeError("secret detail of a bug")
        yield

    monkeypatch.setattr(handler.explainer, "run", broken)
    predict = {"predict": pb.PredictRequest(image=pb.Image(encoded=png())).SerializeToString()}
    replies = run(handler, tiny_model_dir, [explain_item(), predict, {"data": png()}])
    error = explain_reply(replies[0]).error
    assert (error.code, error.message) == ("INTERNAL", INTERNAL_MESSAGE)
    assert json.loads(replies[2])["error"]["message"] == INTERNAL_MESSAGE
    assert pb.PredictResponse.FromString(replies[1]).predictions  # forward only: unaffected
