"""The real gateway (servicer, interceptor, metrics, upstream client) over a fake TorchServe.

Every domain error a handler can report must reach the client as its status code with a
bounded message, TorchServe's own failures as theirs, and every call must be counted with
labels from closed sets -- all without Java.
"""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest

from service._proto.saliency.v1 import saliency_pb2 as pb
from service._proto.saliency.v1 import saliency_pb2_grpc as pb_grpc
from service.gateway.server import Gateway
from service.protocol.errors import _CODES
from service.protocol.names import METHODS
from tests.gateway.fake_torchserve import Script
from tests.gateway.support import MODEL, calls, reply_with, request

CODES = sorted({code for _, code in _CODES})


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
    script.unary["concepts"] = lambda _: pb.GetConceptsResponse(error=error).SerializeToString()
    for rpc, call in [
        ("Explain", lambda: stub.Explain(request(), timeout=30)),
        ("Predict", lambda: stub.Predict(pb.PredictRequest(), timeout=30)),
        ("GetModelInfo", lambda: stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30)),
        ("GetConcepts", lambda: stub.GetConcepts(pb.GetConceptsRequest(), timeout=30)),
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


# What TorchServe 0.12 sends (code, description with the class name grpc-java appends),
# and what the client must see (service.protocol.upstream has the sources).
JAVA = "\norg.pytorch.serve.http.InternalServerException"
TORCHSERVE_FAILURES = [
    ("INTERNAL", "Worker died." + JAVA, "UNAVAILABLE", "worker serving tiny stopped"),
    ("RESOURCE_EXHAUSTED", "Worker died." + JAVA, "UNAVAILABLE", "retry"),  # exit code 137
    (
        "INTERNAL",
        'Model "tiny--predict" has no worker to serve inference request. Please use scale '
        "workers API to add workers. If this is a sequence inference, please check if it is "
        "closed, or expired; or exceeds maxSequenceJobQueueSize\nInternalServerException.()",
        "RESOURCE_EXHAUSTED",
        "server busy",
    ),
    ("INTERNAL", "Out of resources" + JAVA, "RESOURCE_EXHAUSTED", "retry with backoff"),
    ("UNAVAILABLE", "Prediction failed" + JAVA, "UNAVAILABLE", "failed a batch"),
    (
        "INTERNAL",
        "Model not found: tiny\norg.pytorch.serve.archive.model.ModelNotFoundException",
        "NOT_FOUND",
        "model tiny is not loaded",
    ),
    (
        "INTERNAL",
        "Model version: 2 does not exist for model: tiny\n"
        "org.pytorch.serve.archive.model.ModelVersionNotFoundException",
        "NOT_FOUND",
        "not loaded",
    ),
    (
        "INTERNAL",
        "Parameter model_name is required.\nBadRequestException.()",
        "INVALID_ARGUMENT",
        "no model name",
    ),
    (
        "PERMISSION_DENIED",
        "Token Authorization failed. Token either incorrect, expired, or not provided correctly",
        "UNAVAILABLE",
        "refused the gateway's key",
    ),
    ("UNAVAILABLE", "failed to connect to all addresses", "UNAVAILABLE", "not answering"),
    ("RESOURCE_EXHAUSTED", "gRPC message exceeds maximum size", "RESOURCE_EXHAUSTED", "larger"),
    ("DEADLINE_EXCEEDED", "Deadline exceeded", "DEADLINE_EXCEEDED", "deadline exceeded"),
    ("UNIMPLEMENTED", "Method not found: x.y.Z", "INTERNAL", "model server error (UNIMPLEMENTED)"),
]


@pytest.mark.parametrize(("status", "details", "code", "message"), TORCHSERVE_FAILURES)
def test_each_torchserve_failure_gets_its_code_and_a_clean_message(
    gateway: Gateway,
    stub: pb_grpc.ExplainServiceStub,
    script: Script,
    status: str,
    details: str,
    code: str,
    message: str,
) -> None:
    script.unary["request"] = lambda _: (getattr(grpc.StatusCode, status), details)
    script.unary["predict"] = script.unary["request"]
    for call in (
        lambda: stub.Explain(request(), timeout=30),
        lambda: stub.Predict(pb.PredictRequest(), timeout=30),
    ):
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code().name == code  # type: ignore[attr-defined]
        text = err.value.details()  # type: ignore[attr-defined]
        assert message in text
        assert "org.pytorch" not in text and "Exception" not in text and len(text) < 300


def test_an_unknown_model_is_refused_without_an_upstream_call(
    gateway: Gateway, stub: pb_grpc.ExplainServiceStub, script: Script
) -> None:
    # Finding 10: a 20,000-character name made a status over the metadata limit, which the
    # client saw as RESOURCE_EXHAUSTED; the name is echoed at most ~100 characters.
    with pytest.raises(grpc.RpcError) as err:
        stub.Explain(request(model="m" * 20_000), timeout=30)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]
    details = err.value.details()  # type: ignore[attr-defined]
    assert "this server serves tiny" in details
    assert details.count("m") < 250 and len(details) < 300
    assert script.received == []
    assert calls(gateway, "Explain", "NOT_FOUND", model="unknown") == 1


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
