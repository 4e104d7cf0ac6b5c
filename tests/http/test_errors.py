"""Hostile and failing HTTP calls: each gets its status and a bounded JSON error naming
the gRPC code, and the server answers a normal call right after."""

from __future__ import annotations

import base64
import json
import time
from http.client import HTTPConnection

import grpc
import httpx
import pytest

from service._proto.saliency.v1 import saliency_pb2 as pb
from service._proto.saliency.v1 import saliency_pb2_grpc as pb_grpc
from service.gateway.http.kserve import MAX_INSTANCES
from service.gateway.server import Gateway
from service.protocol.errors import _CODES, HTTP_STATUSES, error_from_code
from tests.gateway.fake_torchserve import Script
from tests.gateway.support import MODEL, calls
from tests.http.conftest import body

EXPLAIN = f"/v1/models/{MODEL}:explain"
PREDICT = f"/v1/models/{MODEL}:predict"
B64 = base64.b64encode(b"image").decode()
BAD_BODIES: dict[str, bytes] = {
    "not JSON": b"{'instances': []}",
    "NaN literal": b'{"instances": [{"image": {"b64": "aW1hZ2U="}}], "parameters": {"seed": NaN}}',
    "not an object": b"[1, 2]",
    "no instances": b"{}",
    "empty instances": b'{"instances": []}',
    "unknown top-level key": b'{"instances": [], "inputs": []}',
    "instance not an object": b'{"instances": ["aW1hZ2U="]}',
    "image not b64": b'{"instances": [{"image": "aW1hZ2U="}]}',
    "bad base64": b'{"instances": [{"image": {"b64": "not*base64!"}}]}',
    "empty image": b'{"instances": [{"image": {"b64": ""}}]}',
    "unknown parameter": b'{"instances": [{"image": {"b64": "aW1hZ2U="}}], "parameters": {"k": 1}}',
}
BAD_PARAMETERS: dict[str, tuple[dict[str, object], str]] = {
    # name: (parameters, what the message must name)
    "unknown method": ({"methods": ["telepathy"]}, "telepathy"),
    "method not a name": ({"methods": [3]}, "parameters.methods[0]"),
    "method params not an object": (
        {"methods": [{"name": "rise", "params": [1]}]},
        "parameters.methods[0].params",
    ),
    "method param a list": ({"methods": [{"name": "rise", "params": {"n_masks": [1]}}]}, "n_masks"),
    "unknown mask": ({"mask": "lasso"}, "lasso"),
    "unknown score": ({"scores": ["accuracy"]}, "accuracy"),
    "unknown encoding": ({"map_encoding": "jpeg"}, "jpeg"),
    "top_k zero": ({"top_k": 0}, "parameters.top_k"),
    "top_k a bool": ({"top_k": True}, "parameters.top_k"),
    "top_k too large for the wire": ({"top_k": 2**40}, "parameters.top_k"),
    "negative target": ({"targets": [-1]}, "parameters.targets[0]"),
    "negative seed": ({"seed": -1}, "parameters.seed"),
    "seed a string": ({"seed": "7"}, "parameters.seed"),
}


def served_normally(http: httpx.Client, script: Script) -> None:
    script.unary["predict"] = lambda _: pb.PredictResponse().SerializeToString()
    reply = http.post(PREDICT, json=body())
    assert reply.status_code == 200, reply.text


def refused(reply: httpx.Response, status: int, code: str) -> str:
    assert reply.status_code == status, reply.text
    assert reply.headers["content-type"] == "application/json"
    error = reply.json()["error"]
    assert error["code"] == code
    assert 0 < len(error["message"]) <= 1100
    return str(error["message"])


@pytest.mark.parametrize("name", sorted(BAD_BODIES))
def test_a_malformed_body_is_400(
    name: str, gateway: Gateway, http: httpx.Client, script: Script
) -> None:
    reply = http.post(
        EXPLAIN, content=BAD_BODIES[name], headers={"content-type": "application/json"}
    )
    refused(reply, 400, "INVALID_ARGUMENT")
    assert script.received == []
    served_normally(http, script)


@pytest.mark.parametrize("name", sorted(BAD_PARAMETERS))
def test_bad_parameters_are_400_naming_the_field(
    name: str, gateway: Gateway, http: httpx.Client, script: Script
) -> None:
    parameters, named = BAD_PARAMETERS[name]
    message = refused(http.post(EXPLAIN, json=body(**parameters)), 400, "INVALID_ARGUMENT")
    assert named in message
    assert script.received == []
    served_normally(http, script)


def test_a_long_hostile_value_is_echoed_clipped(http: httpx.Client, script: Script) -> None:
    message = refused(
        http.post(EXPLAIN, json=body(methods=["x" * 100_000])), 400, "INVALID_ARGUMENT"
    )
    assert "100002 characters" in message


def test_too_many_instances_are_refused(http: httpx.Client, script: Script) -> None:
    many = {"instances": [{"image": {"b64": B64}}] * (MAX_INSTANCES + 1)}
    message = refused(http.post(PREDICT, json=many), 400, "INVALID_ARGUMENT")
    assert f"at most {MAX_INSTANCES}" in message
    assert script.received == []


@pytest.mark.parametrize("code", sorted({code for _, code in _CODES}))
def test_each_domain_error_of_the_worker_gets_its_http_status(
    code: str, gateway: Gateway, http: httpx.Client, script: Script
) -> None:
    failed = pb.ExplainResponse(error=pb.Error(code=code, message=f"worker says {code}"))
    script.unary["request"] = lambda _: failed.SerializeToString()
    reply = http.post(EXPLAIN, json=body())
    assert refused(reply, HTTP_STATUSES[code], code) == f"worker says {code}"
    assert error_from_code(code, "").__class__.__name__  # the code is one the client knows
    assert calls(gateway, "Explain", code) == 1  # the same metric as a gRPC call
    served_normally(http, script)


def test_the_status_table_follows_google_rpc() -> None:
    assert HTTP_STATUSES["INVALID_ARGUMENT"] == 400
    assert HTTP_STATUSES["UNAUTHENTICATED"] == 401
    assert HTTP_STATUSES["PERMISSION_DENIED"] == 403
    assert HTTP_STATUSES["NOT_FOUND"] == 404
    assert HTTP_STATUSES["RESOURCE_EXHAUSTED"] == 429
    assert HTTP_STATUSES["CANCELLED"] == 499
    assert HTTP_STATUSES["UNAVAILABLE"] == 503
    assert HTTP_STATUSES["DEADLINE_EXCEEDED"] == 504
    assert HTTP_STATUSES["INTERNAL"] == 500
    import grpc

    assert set(HTTP_STATUSES) == {code.name for code in grpc.StatusCode}


def test_unknown_models_and_paths_are_404(http: httpx.Client, script: Script) -> None:
    refused(http.post("/v1/models/other:explain", json=body()), 404, "NOT_FOUND")
    refused(http.get("/v1/models/" + "m" * 5000), 404, "NOT_FOUND")
    refused(http.get("/v2/models"), 404, "NOT_FOUND")
    refused(http.post(f"/v1/models/{MODEL}:train", json=body()), 404, "NOT_FOUND")
    assert script.received == []
    served_normally(http, script)


def test_a_wrong_verb_is_405(http: httpx.Client) -> None:
    reply = http.get(PREDICT)
    refused(reply, 405, "UNIMPLEMENTED")
    assert "POST" in reply.headers["allow"]


def test_a_declared_body_over_the_limit_is_413_before_it_is_sent(
    gateway: Gateway, http: httpx.Client, script: Script
) -> None:
    assert gateway.http is not None
    connection = HTTPConnection("127.0.0.1", gateway.http.port, timeout=10)
    connection.putrequest("POST", EXPLAIN)
    connection.putheader("content-type", "application/json")
    connection.putheader("content-length", str(10**12))
    connection.endheaders()  # and not one byte of the terabyte it announced
    answer = connection.getresponse()
    assert answer.status == 413
    assert json.loads(answer.read())["error"]["code"] == "RESOURCE_EXHAUSTED"
    connection.close()
    served_normally(http, script)


def test_a_streamed_body_over_the_limit_is_413_when_it_passes_it(
    gateway: Gateway, http: httpx.Client, script: Script
) -> None:
    assert gateway.http is not None
    limit = gateway.http.settings.max_body_bytes

    def chunks():  # no content-length: the server counts as it reads
        sent = 0
        while sent <= limit:
            yield b" " * 1_048_576
            sent += 1_048_576

    try:
        reply = http.post(EXPLAIN, content=chunks())
        refused(reply, 413, "RESOURCE_EXHAUSTED")
    except httpx.TransportError:
        pass  # the server closed the connection mid-upload: no worse a refusal
    assert script.received == []
    served_normally(http, script)


def explain_codes(gateway: Gateway) -> dict[str, float]:
    """Explain calls in the latency histogram, by code label."""
    counts: dict[str, float] = {}
    for metric in gateway.metrics.registry.collect():
        for sample in metric.samples:
            if sample.name.endswith("_count") and sample.labels.get("method") == "Explain":
                counts[sample.labels["code"]] = sample.value
    return counts


def test_a_deadline_is_504_reaches_the_worker_and_is_counted_as_over_grpc(
    gateway: Gateway, http: httpx.Client, script: Script
) -> None:
    def slow(_: object) -> bytes:
        time.sleep(1.0)
        return pb.ExplainResponse().SerializeToString()

    script.unary["request"] = slow
    refused(http.post(EXPLAIN + "?timeout=0.2", json=body()), 504, "DEADLINE_EXCEEDED")
    deadline_ms = int(script.received[0].input["deadline_unix_ms"])
    assert abs(deadline_ms / 1000 - time.time()) < 5  # the worker was told when to stop
    over_http = _settled(gateway)
    assert sum(over_http.values()) == 1

    stub = pb_grpc.ExplainServiceStub(grpc.insecure_channel(f"127.0.0.1:{gateway.port}"))
    with pytest.raises(grpc.RpcError) as err:
        stub.Explain(pb.ExplainRequest(image=pb.Image(encoded=b"x")), timeout=0.2)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[attr-defined]
    over_both = _settled(gateway, total=2)
    assert over_both == {code: 2 * n for code, n in over_http.items()}  # the same label
    served_normally(http, script)


def _settled(gateway: Gateway, total: int = 1) -> dict[str, float]:
    deadline = time.monotonic() + 5.0
    while sum(explain_codes(gateway).values()) < total and time.monotonic() < deadline:
        time.sleep(0.02)
    return explain_codes(gateway)


@pytest.mark.parametrize("value", ["soon", "0", "-1", "nan", "inf", "1e9"])
def test_a_bad_timeout_is_400(value: str, http: httpx.Client, script: Script) -> None:
    refused(http.post(f"{EXPLAIN}?timeout={value}", json=body()), 400, "INVALID_ARGUMENT")
    assert script.received == []


def test_a_bad_stream_flag_is_400(http: httpx.Client) -> None:
    refused(http.post(f"{EXPLAIN}?stream=maybe", json=body()), 400, "INVALID_ARGUMENT")
