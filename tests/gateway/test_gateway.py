"""The real gateway (servicer, interceptor, metrics, upstream client) over a fake TorchServe.

Every domain error a handler can report must reach the client as its status code with a
bounded message, TorchServe's own failures as theirs, and every call must be counted with
labels from closed sets -- all without Java.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from service._proto.saliency.v1 import saliency_pb2 as pb
from service._proto.saliency.v1 import saliency_pb2_grpc as pb_grpc
from service.gateway.server import Gateway
from service.protocol.errors import _CODES
from service.protocol.names import METHODS
from service.stack import running_gateway
from tests.gateway.fake_torchserve import Script, fake_torchserve

MODEL = "tiny"
CODES = sorted({code for _, code in _CODES})


@pytest.fixture
def script() -> Script:
    return Script()


@pytest.fixture
def gateway(script: Script, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Gateway]:
    monkeypatch.setenv("SALIENCY_CANCEL_DIR", str(tmp_path / "cancel"))
    with (
        fake_torchserve(script) as upstream,
        running_gateway(upstream, [MODEL], health_interval_s=60.0) as started,
    ):
        yield started.gateway


@pytest.fixture
def stub(gateway: Gateway) -> Iterator[pb_grpc.ExplainServiceStub]:
    with grpc.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        yield pb_grpc.ExplainServiceStub(channel)


def request(model: str = "") -> pb.ExplainRequest:
    return pb.ExplainRequest(model=model, image=pb.Image(encoded=b"png bytes"))


def calls(gateway: Gateway, rpc: str, code: str, model: str = MODEL) -> float:
    """Calls counted with these labels; waits a little, as the interceptor records a call
    after its status has gone out."""
    labels = {"method": rpc, "model": model, "code": code}
    deadline = time.monotonic() + 5.0
    while True:
        value = gateway.metrics.registry.get_sample_value(
            "saliency_request_duration_seconds_count", labels
        )
        if value or time.monotonic() > deadline:
            return value or 0.0
        time.sleep(0.02)


def reply_with(message: pb.ExplainResponse) -> bytes:
    return message.SerializeToString()


def test_a_reply_passes_through_with_its_stage_metrics(
    gateway: Gateway, stub: pb_grpc.ExplainServiceStub, script: Script
) -> None:
    answer = pb.ExplainResponse(
        model=pb.ModelRef(name=MODEL, version="v1"),
        explanations=[
            pb.Explanation(method=METHODS.number("grad_cam"), seconds=0.25),  # type: ignore[arg-type]
            pb.Explanation(method=999, seconds=0.5),  # type: ignore[arg-type]
        ],
        timings=[pb.StageTiming(stage="decode", seconds=0.01)],
    )
    script.unary["request"] = lambda _: reply_with(answer)
    start = time.time()
    reply = stub.Explain(request(), timeout=30)
    assert reply == answer
    assert calls(gateway, "Explain", "OK") == 1
    stage = gateway.metrics.registry.get_sample_value
    labels = {"stage": "explain", "model": MODEL}
    assert stage("saliency_stage_duration_seconds_sum", {**labels, "explainer": "grad_cam"}) == 0.25
    # A method number this gateway does not know still gets a label from a closed set.
    assert stage("saliency_stage_duration_seconds_sum", {**labels, "explainer": "unknown"}) == 0.5
    # What went upstream: the model, the request as sent, the deadline and a request id.
    [sent] = script.received
    assert sent.model_name == MODEL
    assert pb.ExplainRequest.FromString(sent.input["request"]) == request()
    deadline_s = int(sent.input["deadline_unix_ms"]) / 1000
    assert start + 25 < deadline_s < time.time() + 30.5
    assert len(sent.input["request_id"]) == 32


@pytest.mark.parametrize("code", CODES)
def test_each_domain_error_becomes_its_status(
    gateway: Gateway, stub: pb_grpc.ExplainServiceStub, script: Script, code: str
) -> None:
    error = pb.Error(code=code, message=f"the {code} message")
    script.unary["request"] = lambda _: reply_with(pb.ExplainResponse(error=error))
    script.unary["predict"] = lambda _: pb.PredictResponse(error=error).SerializeToString()
    script.unary["model_info"] = lambda _: pb.ModelInfo(error=error).SerializeToString()
    for rpc, call in [
        ("Explain", lambda: stub.Explain(request(), timeout=30)),
        ("Predict", lambda: stub.Predict(pb.PredictRequest(), timeout=30)),
        ("GetModelInfo", lambda: stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30)),
    ]:
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code().name == code, rpc  # type: ignore[attr-defined]
        assert err.value.details() == f"the {code} message"  # type: ignore[attr-defined]
        assert calls(gateway, rpc, code) == 1


def test_an_unknown_code_is_internal_and_messages_stay_bounded(
    stub: pb_grpc.ExplainServiceStub, script: Script
) -> None:
    error = pb.Error(code="NOT_A_CODE", message="x" * 100_000)
    script.unary["request"] = lambda _: reply_with(pb.ExplainResponse(error=error))
    with pytest.raises(grpc.RpcError) as err:
        stub.Explain(request(), timeout=30)
    assert err.value.code() == grpc.StatusCode.INTERNAL  # type: ignore[attr-defined]
    assert 1000 <= len(err.value.details()) < 1100  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("status", "code", "message"),
    [
        (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAVAILABLE, "model server unavailable"),
        (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.NOT_FOUND, "'tiny' is not served here"),
        (grpc.StatusCode.INTERNAL, grpc.StatusCode.INTERNAL, "model server error: worker died"),
    ],
)
def test_torchserve_failures_keep_their_status(
    gateway: Gateway,
    stub: pb_grpc.ExplainServiceStub,
    script: Script,
    status: grpc.StatusCode,
    code: grpc.StatusCode,
    message: str,
) -> None:
    script.unary["request"] = lambda _: (status, "worker died")
    with pytest.raises(grpc.RpcError) as err:
        stub.Explain(request(), timeout=30)
    assert err.value.code() == code  # type: ignore[attr-defined]
    assert message in err.value.details()  # type: ignore[attr-defined]
    assert calls(gateway, "Explain", code.name) == 1


def test_an_unknown_model_is_refused_without_an_upstream_call(
    gateway: Gateway, stub: pb_grpc.ExplainServiceStub, script: Script
) -> None:
    with pytest.raises(grpc.RpcError) as err:
        stub.Explain(request(model="other" * 1000), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert "this server serves tiny" in err.value.details()  # type: ignore[attr-defined]
    assert len(err.value.details()) < 1100  # type: ignore[attr-defined]
    assert script.received == []
    assert calls(gateway, "Explain", "INVALID_ARGUMENT", model="unknown") == 1


def test_the_stream_forwards_parts_then_the_summary_error(
    gateway: Gateway, stub: pb_grpc.ExplainServiceStub, script: Script
) -> None:
    prediction = pb.ExplainStreamResponse(prediction=pb.PredictResponse())
    explanation = pb.ExplainStreamResponse(
        explanation=pb.Explanation(method=METHODS.number("rise"), seconds=1.0)  # type: ignore[arg-type]
    )
    failed = pb.ExplainStreamResponse(
        summary=pb.ExplainResponse(error=pb.Error(code="DEADLINE_EXCEEDED", message="late"))
    )
    script.stream = lambda _: [p.SerializeToString() for p in (prediction, explanation, failed)]
    parts = []
    with pytest.raises(grpc.RpcError) as err:
        for part in stub.ExplainStream(request(), timeout=30):
            parts.append(part)
    assert parts == [prediction, explanation]
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[attr-defined]
    assert script.received[0].input["stream"] == b"true"
    assert calls(gateway, "ExplainStream", "DEADLINE_EXCEEDED") == 1


def test_a_cancelled_stream_marks_its_request_for_the_worker(
    gateway: Gateway, stub: pb_grpc.ExplainServiceStub, script: Script, tmp_path: Path
) -> None:
    import asyncio

    script.hang_stream = asyncio.Event()  # never set: the upstream keeps working
    prediction = pb.ExplainStreamResponse(prediction=pb.PredictResponse())
    script.stream = lambda _: [prediction.SerializeToString()]
    call = stub.ExplainStream(request(), timeout=30)
    assert next(call) == prediction
    call.cancel()  # type: ignore[attr-defined]
    request_id = script.received[0].input["request_id"].decode()
    mark = tmp_path / "cancel" / request_id
    waited = 0.0
    while not mark.exists() and waited < 10:
        time.sleep(0.05)
        waited += 0.05
    assert mark.exists(), "the gateway did not tell the worker that the caller left"
