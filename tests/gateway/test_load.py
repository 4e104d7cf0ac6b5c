"""Backpressure, fairness and retries at the gateway, over the fake TorchServe.

A pool held busy by the fake stands for workers that are all computing: the gateway must
refuse calls above its bound at once (RESOURCE_EXHAUSTED, retryable), keep routing
Predict to the forward-only pool, and send a call whose worker died once more.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import grpc
import pytest

from service._proto.saliency.v1 import saliency_pb2 as pb
from service._proto.saliency.v1 import saliency_pb2_grpc as pb_grpc
from service._proto.torchserve import inference_pb2 as ts_pb
from service.gateway.admission import Admission, PoolSize
from service.gateway.server import Gateway
from service.gateway.upstream import RetryPolicy
from tests.gateway.fake_torchserve import Reply, Script
from tests.gateway.support import MODEL, calls, request

WORKER_DIED = (
    grpc.StatusCode.INTERNAL,
    "Worker died.\norg.pytorch.serve.http.InternalServerException",
)
OK_EXPLAIN = pb.ExplainResponse(model=pb.ModelRef(name=MODEL)).SerializeToString()


@pytest.fixture
def options() -> dict[str, Any]:
    return {"health_interval_s": 60.0, "max_in_flight": {"explain": 2, "predict": 3}}


def failing_first(times: int, then: Reply) -> Any:
    """A fake reply that is WORKER_DIED for the first ``times`` calls, then ``then``."""
    count = {"n": 0}

    def reply(_: ts_pb.PredictionsRequest) -> Reply:
        count["n"] += 1
        return WORKER_DIED if count["n"] <= times else then

    return reply


def test_overflow_is_refused_at_once_and_predict_is_not_behind_explanations(
    gateway: Gateway, stub: pb_grpc.ExplainServiceStub, script: Script
) -> None:
    busy = threading.Event()
    script.hold[MODEL] = busy  # the explain pool's workers are all computing
    script.unary["request"] = lambda _: OK_EXPLAIN
    script.unary["predict"] = lambda _: pb.PredictResponse().SerializeToString()
    held = [stub.Explain.future(request(), timeout=60) for _ in range(2)]
    script.waiting(2)
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        stub.ExplainStream(request(), timeout=60).next()  # streams count as explanations
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
    assert err.value.details() == (  # type: ignore[attr-defined]
        "server busy: 2 explanations in flight for model tiny; retry with backoff"
    )
    # Refused without waiting for the held calls (which wait up to 60 s).
    assert not any(call.done() for call in held), time.monotonic() - started
    # Predict goes to the forward-only pool, which is free.
    assert stub.Predict(pb.PredictRequest(), timeout=30) == pb.PredictResponse()
    assert [r.model_name for r in script.received] == [MODEL, MODEL, f"{MODEL}--predict"]
    busy.set()
    assert [call.result().model.name for call in held] == [MODEL, MODEL]
    assert stub.Explain(request(), timeout=30).model.name == MODEL  # slots given back
    assert calls(gateway, "ExplainStream", "RESOURCE_EXHAUSTED") == 1
    assert gateway.admission.in_flight == {(MODEL, "explain"): 0, (MODEL, "predict"): 0}


def test_a_call_whose_worker_died_is_sent_once_more_with_the_same_deadline(
    gateway: Gateway, stub: pb_grpc.ExplainServiceStub, script: Script
) -> None:
    script.unary["request"] = failing_first(1, OK_EXPLAIN)
    assert stub.Explain(request(), timeout=30).model.name == MODEL
    first, second = script.received
    assert first.input["deadline_unix_ms"] == second.input["deadline_unix_ms"]
    assert first.input["request_id"] != second.input["request_id"]
    assert gateway.upstream.retries == 1
    retried = {"model": MODEL}
    assert (
        gateway.metrics.registry.get_sample_value("saliency_upstream_retries_total", retried) == 1
    )
    assert calls(gateway, "Explain", "OK") == 1


def test_only_once(gateway: Gateway, stub: pb_grpc.ExplainServiceStub, script: Script) -> None:
    script.unary["request"] = failing_first(2, OK_EXPLAIN)
    with pytest.raises(grpc.RpcError) as err:
        stub.Explain(request(), timeout=30)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
    assert "retry" in err.value.details()  # type: ignore[attr-defined]
    assert len(script.received) == 2


def test_an_overload_is_not_retried(stub: pb_grpc.ExplainServiceStub, script: Script) -> None:
    full = 'Model "tiny" has no worker to serve inference request. Please use scale workers API'
    script.unary["request"] = lambda _: (grpc.StatusCode.INTERNAL, full)
    with pytest.raises(grpc.RpcError) as err:
        stub.Explain(request(), timeout=30)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
    assert len(script.received) == 1  # more load on a full queue helps nobody


def test_a_stream_is_retried_only_before_its_first_part(
    stub: pb_grpc.ExplainServiceStub, script: Script
) -> None:
    prediction = pb.ExplainStreamResponse(prediction=pb.PredictResponse()).SerializeToString()
    done = pb.ExplainStreamResponse(summary=pb.ExplainResponse()).SerializeToString()
    attempts = {"n": 0}

    def died_before_any_part(_: ts_pb.PredictionsRequest) -> list[Reply]:
        attempts["n"] += 1
        return [WORKER_DIED] if attempts["n"] == 1 else [prediction, done]

    script.stream = died_before_any_part
    assert len(list(stub.ExplainStream(request(), timeout=30))) == 2
    assert attempts["n"] == 2

    script.stream = lambda _: [prediction, WORKER_DIED]  # a part already went out
    parts = []
    with pytest.raises(grpc.RpcError) as err:
        for part in stub.ExplainStream(request(), timeout=30):
            parts.append(part)
    assert len(parts) == 1
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
    assert len(script.received) == 3


def test_no_retry_without_time_for_it() -> None:
    policy = RetryPolicy(delay_s=(0.05, 0.15), min_left_s=0.25)
    assert policy.pause(None) is not None  # no deadline
    assert policy.pause(10.0) is not None
    assert policy.pause(0.29) is None  # after any pause, less than min_left_s would be left
    assert all(0.05 <= (policy.pause(10.0) or 0) <= 0.15 for _ in range(100))


def test_bounds_are_sized_from_workers_and_batch() -> None:
    admission = Admission.sized(PoolSize(2, 4), PoolSize(1, 8), batches_per_worker=4)
    assert admission.limits == {"explain": 32, "predict": 32}
    with pytest.raises(ValueError, match="unknown kinds"):
        Admission({"stream": 1})


def test_the_in_flight_gauge_counts_the_calls_being_served(
    gateway: Gateway, stub: pb_grpc.ExplainServiceStub, script: Script
) -> None:
    def in_flight(expected: int) -> float | None:
        """The gauge once it shows ``expected``, or after 10 s: a call's status reaches its
        client just before the gateway's bookkeeping of it ends."""
        deadline = time.monotonic() + 10
        while True:
            value = gateway.metrics.registry.get_sample_value("saliency_requests_in_flight")
            if value == expected or time.monotonic() > deadline:
                return value
            time.sleep(0.01)

    busy = threading.Event()
    script.hold[MODEL] = busy
    script.unary["request"] = lambda _: OK_EXPLAIN
    assert in_flight(0) == 0
    held = [stub.Explain.future(request(), timeout=60) for _ in range(2)]
    script.waiting(2)
    assert in_flight(2) == 2
    with pytest.raises(grpc.RpcError):  # refused (over the bound of 2): in and out again
        stub.Explain(request(), timeout=60)
    assert in_flight(2) == 2
    busy.set()
    assert [call.result().model.name for call in held] == [MODEL, MODEL]
    assert in_flight(0) == 0
