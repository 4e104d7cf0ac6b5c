"""``:explain?stream=true``: server-sent events over ``ExplainStream``, in the order the
worker sends its parts, and a client that leaves stops the worker's job."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import pytest

from service._proto.saliency.v1 import saliency_pb2 as pb
from service.gateway.http import replies
from service.gateway.server import Gateway
from service.protocol.names import METHODS, SCORES
from tests.gateway.fake_torchserve import Script
from tests.gateway.support import MODEL, calls
from tests.http.conftest import body

STREAM = f"/v1/models/{MODEL}:explain?stream=true"
PREDICTION = pb.ExplainStreamResponse(
    prediction=pb.PredictResponse(predictions=[pb.Prediction(index=1, label="disc")])
)
EXPLANATION = pb.ExplainStreamResponse(
    explanation=pb.Explanation(method=METHODS.number("rise"), target=1, seconds=0.5)  # type: ignore[arg-type]
)
REFINEMENT = pb.ExplainStreamResponse(
    refinement=pb.Refinement(
        method=METHODS.number("rise"),  # type: ignore[arg-type]
        target=1,
        params={"n_masks": "256"},
        map=pb.SaliencyMap(width=2, height=1, encoding=pb.MAP_ENCODING_FLOAT16, data=b"\0<\0\0"),
        forwards=32,
        forwards_total=256,
    )
)
SCORES_PART = pb.ExplainStreamResponse(
    scores=pb.ScoreUpdate(
        explanation_index=0,
        scores=[pb.ScoreValue(score=SCORES.number("insertion_auc"), value=0.5)],  # type: ignore[arg-type]
    )
)
SUMMARY = pb.ExplainStreamResponse(
    summary=pb.ExplainResponse(timings=[pb.StageTiming(stage="total", seconds=1.5)])
)


def events(text: str) -> list[tuple[str, dict[str, object]]]:
    """``(event, data)`` of each server-sent event; comment lines skipped."""
    out = []
    for block in text.split("\n\n"):
        lines = [line for line in block.split("\n") if line and not line.startswith(":")]
        if lines:
            fields = dict(line.split(": ", 1) for line in lines)
            out.append((fields["event"], json.loads(fields["data"])))
    return out


def test_each_part_is_an_event_in_order(
    gateway: Gateway, http: httpx.Client, script: Script
) -> None:
    parts = (PREDICTION, REFINEMENT, EXPLANATION, SCORES_PART, SUMMARY)
    script.stream = lambda _: [p.SerializeToString() for p in parts]
    with http.stream("POST", STREAM, json=body(methods=["rise"])) as reply:
        assert reply.status_code == 200
        assert reply.headers["content-type"].startswith("text/event-stream")
        received = events(reply.read().decode())
    assert [name for name, _ in received] == [
        "prediction",
        "refinement",
        "explanation",
        "scores",
        "summary",
    ]
    assert received[0][1]["classes"] == [{"index": 1, "label": "disc", "probability": 0.0}]
    assert received[1][1] == {
        "method": "rise",
        "target": 1,
        "params": {"n_masks": "256"},
        "map": {
            "encoding": "float16",
            "width": 2,
            "height": 1,
            "value_min": 0.0,
            "value_max": 0.0,
            "b64": "ADwAAA==",
        },
        "forwards": 32,
        "forwards_total": 256,
    }
    assert received[2][1]["method"] == "rise" and received[2][1]["target"] == 1
    assert received[3][1] == {"explanation_index": 0, "scores": {"insertion_auc": 0.5}}
    assert received[4][1]["timings"] == {"total": 1.5}
    sent = pb.ExplainRequest.FromString(script.received[0].input["request"])
    assert [m.method for m in sent.methods] == [METHODS.number("rise")]
    assert calls(gateway, "ExplainStream", "OK") == 1


def test_a_part_kind_without_an_encoder_goes_out_under_its_own_name(
    monkeypatch: pytest.MonkeyPatch, gateway: Gateway, http: httpx.Client, script: Script
) -> None:
    # A kind a later proto adds has no entry in PART_ENCODERS: take one away to see it.
    monkeypatch.delitem(replies.PART_ENCODERS, "scores")
    script.stream = lambda _: [p.SerializeToString() for p in (PREDICTION, SCORES_PART)]
    with http.stream("POST", STREAM, json=body()) as reply:
        received = events(reply.read().decode())
    assert received[1] == (
        "scores",
        {"explanation_index": 0, "scores": [{"score": "SCORE_INSERTION_AUC", "value": 0.5}]},
    )


def test_a_failure_before_the_first_part_is_a_plain_json_error(
    http: httpx.Client, script: Script
) -> None:
    failed = pb.ExplainStreamResponse(
        summary=pb.ExplainResponse(error=pb.Error(code="INVALID_ARGUMENT", message="bad image"))
    )
    script.stream = lambda _: [failed.SerializeToString()]
    reply = http.post(STREAM, json=body())
    assert reply.status_code == 400
    assert reply.json() == {"error": {"code": "INVALID_ARGUMENT", "message": "bad image"}}


def test_a_failure_after_the_first_part_is_an_error_event(
    gateway: Gateway, http: httpx.Client, script: Script
) -> None:
    late = pb.ExplainStreamResponse(
        summary=pb.ExplainResponse(error=pb.Error(code="DEADLINE_EXCEEDED", message="late"))
    )
    script.stream = lambda _: [p.SerializeToString() for p in (PREDICTION, EXPLANATION, late)]
    with http.stream("POST", STREAM, json=body()) as reply:
        assert reply.status_code == 200
        received = events(reply.read().decode())
    assert [name for name, _ in received] == ["prediction", "explanation", "error"]
    assert received[2][1] == {
        "error": {"code": "DEADLINE_EXCEEDED", "message": "late"},
        "status": 504,
    }
    assert calls(gateway, "ExplainStream", "DEADLINE_EXCEEDED") == 1


def test_streaming_takes_one_instance(http: httpx.Client, script: Script) -> None:
    two = {"instances": body()["instances"] * 2}  # type: ignore[operator]
    reply = http.post(STREAM, json=two)
    assert reply.status_code == 400 and "one instance" in reply.json()["error"]["message"]
    assert script.received == []


def wait_for(path: Path, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return path.exists()


def test_a_client_that_leaves_cancels_the_workers_job(
    gateway: Gateway, http: httpx.Client, script: Script, tmp_path: Path
) -> None:
    script.hang_stream = asyncio.Event()  # never set: the worker is still busy
    script.stream = lambda _: [PREDICTION.SerializeToString()]
    with http.stream("POST", STREAM, json=body()) as reply:
        lines = reply.iter_lines()
        assert next(lines) == "event: prediction"
    # The connection is closed, mid-stream; no write is pending that could fail.
    request_id = script.received[0].input["request_id"].decode()
    assert wait_for(tmp_path / "cancel" / request_id), "the worker was not told"
    assert calls(gateway, "ExplainStream", "CANCELLED") == 1


def test_a_client_that_leaves_a_unary_call_cancels_it_too(
    http: httpx.Client, script: Script, tmp_path: Path
) -> None:
    script.unary["request"] = lambda _: time.sleep(3) or b""  # type: ignore[func-returns-value]
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
        http.post(f"/v1/models/{MODEL}:explain", json=body(), timeout=0.5)
    request_id = script.received[0].input["request_id"].decode()
    assert wait_for(tmp_path / "cancel" / request_id), "the worker was not told"
