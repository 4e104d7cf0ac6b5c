"""No reply shape may crash TorchServe's frontend or its worker, tested on real TorchServe.

TorchServe 0.12's Java frontend kills the worker of any reply it cannot handle (every
exception of ``GRPCJob.response`` ends ``WorkerThread.run``): a stream's last reply
without ``ts_stream_next`` (NullPointerException, finding 1), or a reply written to a
gRPC call that its deadline has just closed (IllegalStateException "call is closed",
finding 6). After each failure shape below, the worker that served it must still be the
same process (management API), the logs must hold no such exception, and a normal request
must be served. See ``handlers/saliency_handler.py`` for the reply sequences that are safe.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from service._proto.saliency.v1 import saliency_pb2 as pb
from service._proto.saliency.v1 import saliency_pb2_grpc as pb_grpc
from service._proto.torchserve import inference_pb2 as ts_pb
from service._proto.torchserve import inference_pb2_grpc as ts_grpc
from service.archive import BatchConfig
from service.client import SaliencyClient
from service.launcher import TorchServe
from service.protocol.events import EventKind, event_kind
from service.protocol.names import METHODS
from service.stack import RunningGateway, running_torchserve, torchserve_channel

pytestmark = pytest.mark.integration
MODEL = "shapes"
FATAL = (
    "NullPointerException",
    "IllegalStateException",
    "call is closed",
    "Worker died",
    "Backend worker thread exception",
    "Backend worker error",
)


def worker_pids(torchserve: TorchServe) -> dict[str, tuple[int, str]]:
    """Worker id -> (pid, status), as the management API describes the model."""
    described = torchserve.management("GET", f"/models/{MODEL}", timeout=10)
    return {str(w["id"]): (int(w["pid"]), str(w["status"])) for w in described[0]["workers"]}


def all_ready(torchserve: TorchServe, timeout: float = 180.0) -> dict[str, tuple[int, str]]:
    """The workers once every one is READY (the stack waits for the first one only)."""
    end = time.monotonic() + timeout
    while True:
        workers = worker_pids(torchserve)
        if all(status == "READY" for _, status in workers.values()):
            return workers
        assert time.monotonic() < end, f"workers not ready: {workers}"
        time.sleep(0.5)


class Logs:
    """The frontend's and the workers' log lines written since it was made."""

    def __init__(self, torchserve: TorchServe) -> None:
        directory = torchserve.run_dir / "logs"
        self.paths = [directory / "ts_log.log", directory / "model_log.log"]
        self.offsets = {path: _size(path) for path in self.paths}

    def new(self) -> str:
        text = []
        for path in self.paths:
            with path.open("rb") as file:
                file.seek(self.offsets[path])
                text.append(file.read().decode(errors="replace"))
        return "\n".join(text)


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


@pytest.fixture
def watched(torchserve: TorchServe, client: SaliencyClient, samples) -> Iterator[Logs]:  # type: ignore[no-untyped-def]
    """Runs the test, then: same workers, READY, no fatal log line, a normal request served."""
    before = all_ready(torchserve)
    logs = Logs(torchserve)
    yield logs
    reply = client.explain(samples[0][0], methods=["vanilla_gradient"], timeout=60)
    assert reply.explanations
    time.sleep(0.5)  # the frontend logs a worker's death asynchronously
    found = [line for line in logs.new().splitlines() if any(f in line for f in FATAL)]
    assert not found, "\n".join(found[:10])
    assert worker_pids(torchserve) == before


@pytest.fixture(scope="module")
def ts_stub(torchserve: TorchServe) -> Iterator[ts_grpc.InferenceAPIsServiceStub]:
    with torchserve_channel(torchserve) as channel:  # TorchServe's token auth is on
        yield ts_grpc.InferenceAPIsServiceStub(channel)


@pytest.fixture(scope="module")
def stub(gateway: RunningGateway) -> Iterator[pb_grpc.ExplainServiceStub]:
    with grpc.insecure_channel(gateway.address) as channel:
        yield pb_grpc.ExplainServiceStub(channel)


def explain_request(image: bytes, *methods: str, **fields: object) -> pb.ExplainRequest:
    request = pb.ExplainRequest(image=pb.Image(encoded=image), **fields)  # type: ignore[arg-type]
    request.methods.extend(pb.MethodRequest(method=METHODS.number(m)) for m in methods)  # type: ignore[misc]
    return request


def ts_input(key: str, payload: bytes, **extra: str) -> ts_pb.PredictionsRequest:
    request = ts_pb.PredictionsRequest(model_name=MODEL)
    request.input[key] = payload
    request.input["request_id"] = uuid.uuid4().hex.encode()
    for name, value in extra.items():
        request.input[name] = value.encode()
    return request


def in_ms(seconds: float) -> str:
    return str(int((time.time() + seconds) * 1000))


def test_an_invalid_stream_request_leaves_the_worker_alive(
    watched: Logs, stub: pb_grpc.ExplainServiceStub
) -> None:
    """Finding 1: ``ExplainStream(ExplainRequest())`` killed the worker, 6 times in 6."""
    for _ in range(4):
        with pytest.raises(grpc.RpcError) as refused:
            list(stub.ExplainStream(pb.ExplainRequest(), timeout=30))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "image is empty" in (refused.value.details() or "")


def test_a_direct_stream_that_fails_before_its_first_part_completes(
    watched: Logs, ts_stub: ts_grpc.InferenceAPIsServiceStub
) -> None:
    """The same shape on TorchServe's own API: one part (the error summary), then the end,
    with the stream flag and without it (a client that forgot it)."""
    for extra in ({"stream": "true"}, {}):
        parts = list(ts_stub.StreamPredictions(ts_input("request", b"", **extra), timeout=30))
        [part] = parts
        if extra:
            summary = pb.ExplainStreamResponse.FromString(part.prediction)
            assert event_kind(summary) is EventKind.DONE
            error = summary.summary.error
        else:  # answered as a unary request
            error = pb.ExplainResponse.FromString(part.prediction).error
        assert error.code == "INVALID_ARGUMENT"


def test_undecodable_request_bytes_are_invalid_argument(
    watched: Logs, ts_stub: ts_grpc.InferenceAPIsServiceStub
) -> None:
    """Finding 7 (the handler's side): UNKNOWN with a Python exception text before."""
    for key in ("request", "predict"):
        reply = ts_stub.Predictions(ts_input(key, b"\xff\xfe not protobuf \x00"), timeout=30)
        message = pb.ExplainResponse if key == "request" else pb.PredictResponse
        error = message.FromString(reply.prediction).error
        assert error.code == "INVALID_ARGUMENT"
        assert error.message == f"input '{key}' is not a serialized saliency.v1 message"


def slow_sobol(image: bytes) -> pb.ExplainRequest:
    """Sobol for three classes with the fixed design before issue 13 (grid 8, 32 designs, no
    early stop), the ~20 s of work these tests need; the default takes a tenth of that."""
    request = explain_request(image, "sobol", top_k=3)
    request.methods[0].params.update({"grid_size": "8", "n_designs": "32", "tolerance": "0"})
    return request


def test_a_stream_that_fails_mid_way_ends_with_its_error(
    watched: Logs, ts_stub: ts_grpc.InferenceAPIsServiceStub, samples
) -> None:  # type: ignore[no-untyped-def]
    """Parts sent, then a failing summary: the deadline (given only to the handler, as a
    client of TorchServe's API may) stops Sobol's 20 s of work after the prediction."""
    request = slow_sobol(samples[7][0])
    call = ts_stub.StreamPredictions(
        ts_input("request", request.SerializeToString(), stream="true", deadline_unix_ms=in_ms(2)),
        timeout=60,
    )
    parts = [pb.ExplainStreamResponse.FromString(reply.prediction) for reply in call]
    assert event_kind(parts[0]) is EventKind.PREDICTION
    assert event_kind(parts[-1]) is EventKind.DONE
    assert parts[-1].summary.error.code == "DEADLINE_EXCEEDED"


def test_streams_whose_deadline_expires_mid_way_leave_the_worker_alive(
    watched: Logs, stub: pb_grpc.ExplainServiceStub, samples
) -> None:  # type: ignore[no-untyped-def]
    """Finding 6: a reply written as the call's deadline closed it crashed the worker."""
    request = slow_sobol(samples[7][0])
    for timeout in (1.0, 1.6, 2.2):
        with pytest.raises(grpc.RpcError) as expired:
            list(stub.ExplainStream(request, timeout=timeout))
        assert expired.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_a_stream_cancelled_by_its_client_leaves_the_worker_alive(
    watched: Logs, stub: pb_grpc.ExplainServiceStub, samples
) -> None:  # type: ignore[no-untyped-def]
    request = slow_sobol(samples[7][0])
    for _ in range(2):
        call = stub.ExplainStream(request, timeout=60)
        first = next(call)
        assert event_kind(first) is EventKind.PREDICTION
        call.cancel()
        with pytest.raises(grpc.RpcError) as cancelled:
            next(call)
        assert cancelled.value.code() == grpc.StatusCode.CANCELLED
        time.sleep(0.5)  # the worker sees the mark at its next chunk


@pytest.fixture(scope="module")
def one_batch_torchserve(
    model_store: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TorchServe]:
    """The default archive on a TorchServe of its own: one worker, batch 4 and a 20 s batch
    window, so four requests sent together always form one batch however loaded the
    machine is (a full batch is dispatched at once; the window is only a ceiling)."""
    from bench.e2e.servers import variant

    config = BatchConfig(workers=1, batch_size=4, max_batch_delay_ms=20_000)
    mar = variant(model_store / "shapes.mar", config)
    run_dir = tmp_path_factory.mktemp("ts-one-batch")
    with running_torchserve(model_store, {MODEL: mar.name}, run_dir, split_pools=False) as ts:
        yield ts


def test_an_invalid_request_batched_with_slow_work_is_answered_at_once(
    one_batch_torchserve: TorchServe, samples
) -> None:  # type: ignore[no-untyped-def]
    """Finding 12: an occlusion request with stride 0, batched with Sobol, got its answer
    only when Sobol's batch finished. Four requests form one batch (``one_batch_model``):
    a slow unary call, a slow stream, the invalid request and a Predict. The last two must
    be answered while the slow ones still work (they end at their 6 s deadline), the
    stream still gets its parts and its end, and the worker survives."""
    before = all_ready(one_batch_torchserve)
    logs = Logs(one_batch_torchserve)
    image = samples[7][0]
    slow = slow_sobol(image).SerializeToString()
    invalid = explain_request(image, "occlusion")
    invalid.methods[0].params["stride"] = "0"
    predict = pb.PredictRequest(image=pb.Image(encoded=image)).SerializeToString()
    finished: list[str] = []
    stream_parts: list[pb.ExplainStreamResponse] = []

    def call(name: str, request: ts_pb.PredictionsRequest) -> None:
        if name == "stream":
            for reply in batch_stub.StreamPredictions(request, timeout=60):
                stream_parts.append(pb.ExplainStreamResponse.FromString(reply.prediction))
        else:
            batch_stub.Predictions(request, timeout=60)
        finished.append(name)

    unary = {"stream": "false"}  # as the gateway says of a unary call
    threads = [
        threading.Thread(target=call, args=(name, request))
        for name, request in (
            ("slow", ts_input("request", slow, deadline_unix_ms=in_ms(6), **unary)),
            ("stream", ts_input("request", slow, deadline_unix_ms=in_ms(6), stream="true")),
            ("invalid", ts_input("request", invalid.SerializeToString(), **unary)),
            ("predict", ts_input("predict", predict, **unary)),
        )
    ]
    with torchserve_channel(one_batch_torchserve) as channel:
        batch_stub = ts_grpc.InferenceAPIsServiceStub(channel)
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    for quick in ("invalid", "predict"):
        assert finished.index(quick) < min(finished.index("slow"), finished.index("stream"))
    assert event_kind(stream_parts[0]) is EventKind.PREDICTION
    assert stream_parts[-1].summary.error.code == "DEADLINE_EXCEEDED"
    time.sleep(0.5)  # the frontend logs a worker's death asynchronously
    found = [line for line in logs.new().splitlines() if any(f in line for f in FATAL)]
    assert not found, "\n".join(found[:10])
    assert worker_pids(one_batch_torchserve) == before


def test_the_http_json_path_still_gets_whole_replies(
    watched: Logs, torchserve: TorchServe, samples
) -> None:  # type: ignore[no-untyped-def]
    """Final replies over HTTP carry no stream header (it would turn them into chunks)."""
    url = f"http://127.0.0.1:{torchserve.ports.inference}/predictions/{MODEL}"
    boundary = uuid.uuid4().hex
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="data"; filename="x.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + samples[0][0]
        + f"\r\n--{boundary}--\r\n".encode()
    )
    headers = {
        "Content-Type": f"multipart/form-data; boundary={boundary}",
        "Authorization": f"Bearer {torchserve.key('inference')}",
    }
    request = urllib.request.Request(url, data=body, headers=headers)
    with urllib.request.urlopen(request, timeout=60) as reply:
        answer = json.loads(reply.read())
    assert answer["explanations"][0]["map"]["data"]
