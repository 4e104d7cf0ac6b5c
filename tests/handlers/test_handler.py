"""The TorchServe handler without Java: TorchServe's own worker code and a real tiny bundle.

TorchServe answers a whole batch or none of it, so the handler must turn every item's
failure -- bad bytes, a bad deadline, an unknown method, a bug -- into that item's reply
and leave the other items' replies as if they had been alone. Every batch here also goes
through ``tests.handlers.frontend``: the messages TorchServe's worker code writes from
what the handler did, replayed through the rules of the Java frontend.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from handlers import saliency_handler
from handlers.saliency_handler import INTERNAL_MESSAGE, SaliencyHandler, longest_work_s
from service._proto.saliency.v1 import saliency_pb2 as pb
from service.client.decode import decode_map
from service.protocol.events import EventKind, event_kind
from service.protocol.limits import Limits
from service.protocol.names import METHODS
from service.serving.cancel import CancelBoard
from service.serving.pipeline import Explainer
from tests.handlers.frontend import Batch, Call, context, handle
from tests.serving.test_pipeline import png
from tests.serving.test_refine import (
    COARSE_FORWARDS,
    close_in_float16,
    coarse_reference,
    occlusion_request,
)


@pytest.fixture(scope="module")
def handler(tiny_model_dir: Path) -> Iterator[SaliencyHandler]:
    threads = torch.get_num_threads()  # initialize() sets the worker's thread count
    worker = SaliencyHandler()
    worker.initialize(context(tiny_model_dir, ["unary"]))
    yield worker
    torch.set_num_threads(threads)


UNARY = {"stream": b"false"}  # what the gateway sends with a unary call


def explain_item(*methods: str, **extra: object) -> dict[str, Any]:
    request = pb.ExplainRequest(image=pb.Image(encoded=png()), seed=3)
    request.methods.extend(pb.MethodRequest(method=METHODS.number(m)) for m in methods)  # type: ignore[misc]
    return {"request": request.SerializeToString(), **UNARY, **extra}


def with_params(method: str, **params: str) -> dict[str, Any]:
    request = pb.ExplainRequest(image=pb.Image(encoded=png()), seed=3)
    request.methods.append(pb.MethodRequest(method=METHODS.number(method), params=params))  # type: ignore[arg-type]
    return {"request": request.SerializeToString(), **UNARY}


def predict_item() -> dict[str, Any]:
    predict = pb.PredictRequest(image=pb.Image(encoded=png()), top_k=2)
    return {"predict": predict.SerializeToString(), **UNARY}


def run(
    handler: SaliencyHandler,
    model_dir: Path,
    items: list[dict[str, Any]],
    calls: list[Call] | None = None,
) -> Batch:
    return handle(handler, model_dir, items, calls or ["unary"] * len(items))


def explained(batch: Batch, index: int) -> pb.ExplainResponse:
    return pb.ExplainResponse.FromString(batch.reply(index))


def in_ms(seconds: float) -> bytes:
    return str(int((time.time() + seconds) * 1000)).encode()


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
        predict_item(),
        {"predict": b"\xff\xff\xff"},
        {"model_info": b""},
        {"data": png(), "methods": b"grad_cam,deconvnet"},
        {"data": png(), "mask": b"grabcut", "top_k": b"2"},
        {"nothing": b""},
        explain_item("grad_cam"),
    ]
    batch = run(handler, tiny_model_dir, items)
    first, last = explained(batch, 0), explained(batch, 11)
    assert not first.error.code and len(first.explanations) == 1
    assert not last.error.code and last.explanations[0].method == METHODS.number("grad_cam")
    codes = [explained(batch, i).error for i in (1, 2, 3, 4)]
    assert [e.code for e in codes] == ["INVALID_ARGUMENT"] * 4
    # Finding 7: no protobuf exception text, and which input was bad.
    assert codes[0].message == "input 'request' is not a serialized saliency.v1 message"
    assert "deadline_unix_ms" in codes[1].message and "'soon'" in codes[1].message
    assert "deadline_unix_ms" in codes[2].message
    assert "unknown method number 999" in codes[3].message
    assert len(pb.PredictResponse.FromString(batch.reply(5)).predictions) == 2
    assert pb.PredictResponse.FromString(batch.reply(6)).error.code == "INVALID_ARGUMENT"
    info = pb.ModelInfo.FromString(batch.reply(7))
    assert [m.name for m in info.methods] == sorted(METHODS.names())
    bad_json = json.loads(batch.reply(8))["error"]
    assert (
        bad_json["code"] == "INVALID_ARGUMENT"
        and "unknown method 'deconvnet'" in bad_json["message"]
    )
    assert "vanilla_gradient" in bad_json["message"]  # the known names are listed
    good_json = json.loads(batch.reply(9))
    assert len(good_json["explanations"]) == 2 and good_json["explanations"][0]["mask"]["png"]
    assert json.loads(batch.reply(10))["error"]["code"] == "INVALID_ARGUMENT"
    # The good explanation is what it would have been alone.
    alone = run(handler, tiny_model_dir, [explain_item("vanilla_gradient")])
    assert explained(alone, 0).explanations[0].map.data == first.explanations[0].map.data


def test_what_is_ready_goes_before_the_slow_work_of_the_batch(
    handler: SaliencyHandler, tiny_model_dir: Path
) -> None:
    """Finding 12: a refused request (and a Predict) waited for the batch's slow work."""
    items = [
        with_params("occlusion", stride="0"),
        explain_item("vanilla_gradient"),  # its group runs first: done while RISE works
        predict_item(),
        {"model_info": b"", **UNARY},
        explain_item("rise"),
    ]
    batch = run(handler, tiny_model_dir, items)
    assert explained(batch, 0).error.code == "INVALID_ARGUMENT"
    assert [batch.early(i) for i in range(5)] == [True, True, True, True, False]
    # Predict and model info first, then the refused request (planning runs before any
    # group), the vanilla gradient once its group is done, RISE in the final message.
    assert [batch.of(i)[0].message for i in range(5)] == [2, 3, 0, 1, 4]
    # Without explanations in the batch, everything goes in the final message.
    quick = run(handler, tiny_model_dir, [predict_item(), {"predict": b"\x01", **UNARY}])
    assert len(quick.messages) == 1


def test_only_a_declared_unary_grpc_call_replies_early(
    handler: SaliencyHandler, tiny_model_dir: Path
) -> None:
    """A stream's last part or an HTTP reply sent early would break the frontend's batch,
    and a call that does not say it is unary may be a stream that forgot its flag."""
    refused = {"request": b"\x00"}
    items = [
        {**refused, "stream": b"true"},
        {"data": png(), "methods": b"deconvnet", **UNARY},
        refused,
        explain_item("rise"),
    ]
    batch = run(handler, tiny_model_dir, items, ["stream", "http", "stream", "unary"])
    assert [batch.early(i) for i in range(3)] == [False, False, False]
    [summary] = batch.of(0)
    assert pb.ExplainStreamResponse.FromString(summary.payload).summary.error.code
    assert "ts_stream_next" not in batch.of(1)[0].headers  # a whole HTTP reply


def test_a_stream_that_fails_before_its_first_part_ends_with_the_header(
    handler: SaliencyHandler, tiny_model_dir: Path
) -> None:
    """Finding 1: its only part had no ``ts_stream_next``: a NullPointerException in the
    frontend, and a dead worker. Also when the client forgot the stream flag."""
    items = [
        {"request": b"", "stream": b"true"},
        {"request": b""},
        explain_item("vanilla_gradient"),
    ]
    batch = run(handler, tiny_model_dir, items, ["stream", "stream", "unary"])
    for index in (0, 1):
        [part] = batch.of(index)
        assert part.headers["ts_stream_next"] == "false"
    summary = pb.ExplainStreamResponse.FromString(batch.of(0)[0].payload)
    assert event_kind(summary) is EventKind.DONE
    assert summary.summary.error.code == "INVALID_ARGUMENT"


def test_a_passed_deadline_fails_only_its_item(
    handler: SaliencyHandler, tiny_model_dir: Path
) -> None:
    batch = run(
        handler,
        tiny_model_dir,
        [
            explain_item("smoothgrad", deadline_unix_ms=in_ms(-5)),
            explain_item("smoothgrad", deadline_unix_ms=in_ms(600)),
        ],
    )
    assert explained(batch, 0).error.code == "DEADLINE_EXCEEDED"
    on_time = explained(batch, 1)
    assert not on_time.error.code and len(on_time.explanations) == 1


def test_a_request_without_a_deadline_gets_the_default_one(
    handler: SaliencyHandler, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Finding 5: with no deadline, work ran until TorchServe killed the worker."""
    assert handler.explainer is not None
    hurried = Explainer(handler.explainer.bundle, Limits(default_deadline_s=1e-6))
    monkeypatch.setattr(handler, "explainer", hurried)
    batch = run(
        handler,
        tiny_model_dir,
        [explain_item("rise"), explain_item("rise", deadline_unix_ms=in_ms(600))],
    )
    assert explained(batch, 0).error.code == "DEADLINE_EXCEEDED"
    assert not explained(batch, 1).error.code  # its own deadline, not the default


def test_no_deadline_outlives_what_torchserve_allows_a_batch(
    handler: SaliencyHandler, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert longest_work_s({}) == 100.0  # TorchServe's 120 s default, less 20
    assert longest_work_s({"responseTimeout": 30}) == 15.0
    monkeypatch.setattr(handler, "longest_work_s", 1e-6)
    batch = run(handler, tiny_model_dir, [explain_item("rise", deadline_unix_ms=in_ms(3600))])
    assert explained(batch, 0).error.code == "DEADLINE_EXCEEDED"


def test_a_reply_due_at_its_deadline_waits_until_the_call_has_closed(
    handler: SaliencyHandler, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Finding 6: a reply written as the deadline closed the call killed the worker."""
    waits: list[float] = []
    monkeypatch.setattr(saliency_handler.time, "sleep", waits.append)
    deadline = time.time() + 0.1  # the reply is ready within the quiet window
    batch = run(
        handler, tiny_model_dir, [explain_item("vanilla_gradient", deadline_unix_ms=in_ms(0.1))]
    )
    assert len(batch.messages) == 1
    [wait] = waits
    assert 0.0 < wait <= 0.1 + 2 * 0.25
    assert time.time() + wait > deadline  # past it: the frontend drops the reply


def test_stream_parts_go_to_the_streaming_item_only(
    handler: SaliencyHandler, tiny_model_dir: Path
) -> None:
    streamed = explain_item("vanilla_gradient", "grad_cam", stream=b"true")
    streamed_request = pb.ExplainRequest.FromString(streamed["request"])
    streamed_request.scores.append(pb.SCORE_DELETION_AUC)
    streamed["request"] = streamed_request.SerializeToString()
    batch = run(
        handler, tiny_model_dir, [explain_item("vanilla_gradient"), streamed], ["unary", "stream"]
    )
    parts = [pb.ExplainStreamResponse.FromString(p.payload) for p in batch.of(1)]
    assert [event_kind(p) for p in parts] == [
        EventKind.PREDICTION,
        EventKind.EXPLANATION,
        EventKind.SCORES,
        EventKind.EXPLANATION,
        EventKind.SCORES,
        EventKind.DONE,
    ]
    assert not parts[-1].summary.error.code and not parts[-1].summary.explanations
    assert len(explained(batch, 0).explanations) == 1  # the unary item, untouched


def test_a_cancelled_request_is_left_out_of_every_later_message(
    handler: SaliencyHandler, tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    board = CancelBoard(tmp_path)
    monkeypatch.setattr(handler, "cancels", board)
    gone = "a" * 32
    board.cancel(gone)
    items = [
        explain_item("rise", stream=b"true", request_id=gone.encode()),
        explain_item("vanilla_gradient", request_id=b"b" * 32),
    ]
    batch = run(handler, tiny_model_dir, items, ["stream", "unary"])
    assert batch.of(0) == []  # its call was cancelled: nothing to race with its closing
    assert not explained(batch, 1).error.code


def test_a_bug_fails_its_items_with_a_generic_internal_error(
    handler: SaliencyHandler, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert handler.explainer is not None

    def broken(jobs: object) -> Iterator[object]:
        raise RuntimeError("secret detail of a bug")
        yield

    monkeypatch.setattr(handler.explainer, "run", broken)
    items = [explain_item(), predict_item(), {"data": png()}]
    batch = run(handler, tiny_model_dir, items)
    error = explained(batch, 0).error
    assert (error.code, error.message) == ("INTERNAL", INTERNAL_MESSAGE)
    assert json.loads(batch.reply(2))["error"]["message"] == INTERNAL_MESSAGE
    assert pb.PredictResponse.FromString(batch.reply(1)).predictions  # forward only: unaffected


def test_refinements_reach_each_stream_of_a_mixed_batch_and_no_unary_call(
    handler: SaliencyHandler, tiny_model_dir: Path
) -> None:
    """Occlusion for three callers in one engine call: each stream gets the coarse map of
    its own target before its explanation, the unary call none, and every message passes
    the frontend's rules."""

    def item(target: int, call: dict[str, bytes]) -> dict[str, Any]:
        return {"request": occlusion_request(target_classes=[target]).SerializeToString(), **call}

    stream = {"stream": b"true"}
    items = [item(1, stream), item(1, UNARY), item(3, stream)]
    batch = run(handler, tiny_model_dir, items, ["stream", "unary", "stream"])
    for index, target in ((0, 1), (2, 3)):
        parts = [pb.ExplainStreamResponse.FromString(p.payload) for p in batch.of(index)]
        assert [event_kind(p) for p in parts] == [
            EventKind.PREDICTION,
            EventKind.REFINEMENT,
            EventKind.EXPLANATION,
            EventKind.DONE,
        ]
        refinement = parts[1].refinement
        assert refinement.target == parts[2].explanation.target == target
        assert refinement.forwards == COARSE_FORWARDS
        close_in_float16(decode_map(refinement.map), coarse_reference(tiny_model_dir, target))
    [unary] = explained(batch, 1).explanations  # one reply, no part before it
    assert len(batch.of(1)) == 1
    first_stream = pb.ExplainStreamResponse.FromString(batch.of(0)[2].payload)
    assert unary.map == first_stream.explanation.map  # same request, same map
