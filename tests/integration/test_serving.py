"""A gRPC client against the real gateway in front of real TorchServe."""

import io
import json
import re
import subprocess
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image

from service._proto.saliency.v1 import saliency_pb2 as pb
from service._proto.saliency.v1 import saliency_pb2_grpc as pb_grpc
from service.client import SaliencyClient, decode_map, decode_mask
from service.engine.registry import method_names
from service.protocol.names import METHODS
from service.runtime.onnx_forward import cpu_quota

pytestmark = pytest.mark.integration
SEVERAL = ["vanilla_gradient", "grad_cam", "integrated_gradients", "smoothgrad"]


def test_model_info_comes_from_the_registry(client: SaliencyClient) -> None:
    info = client.model_info()
    assert info.model.name == "shapes" and info.model.version
    assert [m.name for m in info.methods] == method_names()
    assert len(info.labels) >= 8


def test_explain_several_methods_in_one_call(client: SaliencyClient, samples) -> None:  # type: ignore[no-untyped-def]
    data, label, truth = samples[0]
    reply = client.explain(data, methods=SEVERAL, top_k=1, mask="grabcut")
    assert reply.predictions[0].index == label
    assert [e.method for e in reply.explanations] == [METHODS.number(m) for m in SEVERAL]
    for item in reply.explanations:
        saliency = decode_map(item.map)
        assert saliency.shape == truth.shape
        assert np.isfinite(saliency).all() and saliency.max() > saliency.min()
        assert decode_mask(item.mask).shape == truth.shape
    assert reply.explanations[2].HasField("completeness_error")
    assert {t.stage for t in reply.timings} >= {"decode", "forward", "explain", "total"}


def test_stream_delivers_the_prediction_before_the_maps(client: SaliencyClient, samples) -> None:  # type: ignore[no-untyped-def]
    data, label, _ = samples[1]
    parts = list(
        client.explain_stream(data, methods=["grad_cam", "smoothgrad"], scores=["deletion_auc"])
    )
    kinds = [p.WhichOneof("part") for p in parts]
    assert kinds == ["prediction", "explanation", "scores", "explanation", "scores", "summary"]
    assert parts[0].prediction.predictions[0].index == label
    assert not parts[-1].summary.explanations  # sent one by one, not twice


def test_a_stream_shows_anytime_maps_first_and_ends_on_the_unary_answer(
    client: SaliencyClient,
    gateway,
    samples,
    tmp_path,  # type: ignore[no-untyped-def]
) -> None:
    """Occlusion's coarse map and RISE's first look arrive as refinements, each after at
    most 32 forwards and before its explanation; the explanations are the unary call's."""
    data, _, truth = samples[3]
    options = {"methods": ["occlusion", "rise"], "seed": 9, "map_encoding": "float16"}
    parts = list(client.explain_stream(data, **options))  # type: ignore[arg-type]
    kinds = [p.WhichOneof("part") for p in parts]
    assert kinds[0] == "prediction" and kinds[-1] == "summary"
    explanations = [p.explanation for p in parts if p.WhichOneof("part") == "explanation"]
    assert [e.method for e in explanations] == [METHODS.number(m) for m in options["methods"]]
    for explanation in explanations:
        at = next(i for i, p in enumerate(parts) if p.explanation == explanation)
        refinements = [
            p.refinement
            for p in parts[:at]
            if p.WhichOneof("part") == "refinement" and p.refinement.method == explanation.method
        ]
        assert refinements, f"no refinement before {METHODS.label(explanation.method)}"
        first = refinements[0]
        assert 0 < first.forwards <= 32 < first.forwards_total
        assert first.target == explanation.target and first.params == explanation.params
        assert decode_map(first.map).shape == truth.shape
    assert not any(p.WhichOneof("part") == "refinement" for p in parts[kinds.index("summary") :])
    unary = client.explain(data, **options)  # type: ignore[arg-type]
    assert [u.map for u in unary.explanations] == [e.map for e in explanations]
    # The CLI prints one progress line per refinement.
    image = tmp_path / "sample.png"
    image.write_bytes(data)
    done = subprocess.run(
        [
            sys.executable, "-m", "service.cli", "explain", str(image), "--stream",
            "--method", "occlusion", "--address", gateway.address, "--out", str(tmp_path),
        ],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert re.search(r"^occlusion target \d+: map after \d+/\d+ forwards$", done.stdout, re.M)


def test_predict(client: SaliencyClient, samples) -> None:  # type: ignore[no-untyped-def]
    data, label, _ = samples[2]
    reply = client.predict(data, top_k=3)
    assert len(reply.predictions) == 3 and reply.predictions[0].index == label


def test_default_wire_size_of_a_224_map_and_mask(client: SaliencyClient) -> None:
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (224, 224, 3), dtype=np.uint8)).save(buffer, "PNG")
    reply = client.explain(buffer.getvalue(), methods=["vanilla_gradient"])
    item = reply.explanations[0]
    assert (item.map.width, item.map.height) == (224, 224)
    assert len(item.map.data) + len(item.mask.png) <= 80_000


def bomb() -> bytes:
    buffer = io.BytesIO()
    Image.new("1", (30000, 30000)).save(buffer, format="PNG")
    return buffer.getvalue()


BAD_INPUTS = {
    "not an image": (
        pb.ExplainRequest(image=pb.Image(encoded=b"GIF? no, text")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "not a PNG",
    ),
    "empty image": (pb.ExplainRequest(image=pb.Image()), grpc.StatusCode.INVALID_ARGUMENT, "empty"),
    "decompression bomb": (
        pb.ExplainRequest(image=pb.Image(encoded=bomb())),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "pixel limit",
    ),
    "unknown method": (
        pb.ExplainRequest(methods=[pb.MethodRequest(method=999)]),  # type: ignore[list-item]
        grpc.StatusCode.INVALID_ARGUMENT,
        "unknown method",
    ),
    "target out of range": (
        pb.ExplainRequest(target_classes=[1000]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "out of range",
    ),
    "unknown model": (pb.ExplainRequest(model="nope"), grpc.StatusCode.NOT_FOUND, "'nope'"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gets_a_clear_status_and_serving_goes_on(
    channel: grpc.Channel,
    client: SaliencyClient,
    samples,
    case: str,  # type: ignore[no-untyped-def]
) -> None:
    request, code, message = BAD_INPUTS[case]
    if not request.image.encoded and case not in ("empty image",):
        request.image.encoded = samples[0][0]
    stub = pb_grpc.ExplainServiceStub(channel)
    with pytest.raises(grpc.RpcError) as caught:
        stub.Explain(request, timeout=60)
    assert caught.value.code() == code
    assert message in caught.value.details()
    assert client.predict(samples[0][0]).predictions  # still serving


def test_oversized_message_is_resource_exhausted(
    channel: grpc.Channel, client: SaliencyClient, samples
) -> None:  # type: ignore[no-untyped-def]
    stub = pb_grpc.ExplainServiceStub(channel)
    huge = pb.ExplainRequest(image=pb.Image(encoded=b"\0" * (18 * 1024 * 1024)))
    with pytest.raises(grpc.RpcError) as caught:
        stub.Explain(huge, timeout=60)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert client.predict(samples[0][0]).predictions


def test_deadline_exceeded_then_served_at_once(client: SaliencyClient, samples) -> None:  # type: ignore[no-untyped-def]
    data = samples[3][0]
    with pytest.raises(grpc.RpcError) as caught:
        client.explain(data, methods=[("smoothgrad", {"n_samples": 256})], top_k=3, timeout=0.3)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert client.explain(data, timeout=30).explanations


def test_concurrent_requests_batch_and_match_solo_answers(client: SaliencyClient, samples) -> None:  # type: ignore[no-untyped-def]
    methods = ["vanilla_gradient", "grad_cam", "smoothgrad"]
    work = [(samples[i % len(samples)][0], [methods[i % 3]], i % 2 + 1) for i in range(12)]
    with ThreadPoolExecutor(8) as pool:
        together = list(
            pool.map(lambda w: client.explain(w[0], methods=w[1], top_k=w[2], seed=3), work)
        )
    for (data, method, top_k), reply in list(zip(work, together, strict=True))[:4]:
        alone = client.explain(data, methods=method, top_k=top_k, seed=3)
        for a, b in zip(alone.explanations, reply.explanations, strict=True):
            # 8-bit PNG maps: batching changes float rounding at the last bits, which moves a
            # value on a bin edge by one step (1 pixel in 16384 seen); a mixed-up row would
            # be off by far more.
            step = (a.map.value_max - a.map.value_min) / 255
            np.testing.assert_allclose(
                decode_map(a.map), decode_map(b.map), rtol=1e-4, atol=1.01 * step
            )


def test_health_and_reflection(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "saliency.v1.ExplainService"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
    [answer] = list(
        reflect.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
        )
    )
    names = {s.name for s in answer.list_services_response.service}
    assert {"saliency.v1.ExplainService", "grpc.health.v1.Health"} <= names


def test_plain_torchserve_client_gets_json_with_maps(torchserve, samples) -> None:  # type: ignore[no-untyped-def]
    from service._proto.torchserve import inference_pb2, inference_pb2_grpc

    data, label, truth = samples[4]
    key = (("authorization", f"Bearer {torchserve.key('inference')}"),)  # TorchServe's token
    with grpc.insecure_channel(f"127.0.0.1:{torchserve.ports.grpc_inference}") as ch:
        stub = inference_pb2_grpc.InferenceAPIsServiceStub(ch)
        reply = stub.Predictions(
            inference_pb2.PredictionsRequest(
                model_name="shapes", input={"data": data, "methods": b"grad_cam,vanilla_gradient"}
            ),
            timeout=60,
            metadata=key,
        )
        answer = json.loads(reply.prediction)
        assert answer["predictions"][0]["index"] == label
        assert [e["method"] for e in answer["explanations"]] == [
            "METHOD_GRAD_CAM",
            "METHOD_VANILLA_GRADIENT",
        ]
        pixels = np.asarray(
            Image.open(
                io.BytesIO(__import__("base64").b64decode(answer["explanations"][0]["map"]["data"]))
            )
        )
        assert pixels.shape == truth.shape
        # ...and the typed way through the same endpoint.
        typed = stub.Predictions(
            inference_pb2.PredictionsRequest(
                model_name="shapes",
                input={
                    "request": pb.ExplainRequest(image=pb.Image(encoded=data)).SerializeToString()
                },
            ),
            timeout=60,
            metadata=key,
        )
        assert pb.ExplainResponse.FromString(typed.prediction).predictions[0].index == label


def test_metrics_are_exported(gateway, client: SaliencyClient, samples) -> None:  # type: ignore[no-untyped-def]
    client.explain(samples[5][0], methods=["grad_cam"])
    text = urllib.request.urlopen(gateway.metrics_url, timeout=5).read().decode()
    assert (
        'saliency_request_duration_seconds_count{code="OK",method="Explain",model="shapes"}' in text
    )
    assert (
        'saliency_stage_duration_seconds_count{explainer="grad_cam",model="shapes",stage="explain"}'
        in text
    )
    assert "saliency_requests_in_flight 0.0" in text
    assert "saliency_upstream_ready 1.0" in text


def test_sobol_past_its_deadline_stops_and_the_next_request_is_served_at_once(
    client: SaliencyClient,
    samples,  # type: ignore[no-untyped-def]
) -> None:
    import time

    data = samples[7][0]
    # Sobol on 3 targets is 6336 forwards, ~20 s here: the 8 s bound below only holds if
    # the worker stopped at the deadline instead of finishing first.
    with pytest.raises(grpc.RpcError) as caught:
        client.explain(data, methods=["sobol"], top_k=3, timeout=1.0)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    start = time.perf_counter()
    reply = client.explain(data, methods=["vanilla_gradient"], timeout=30)
    elapsed = time.perf_counter() - start
    assert reply.explanations
    assert elapsed < 8.0, f"next request waited {elapsed:.1f}s behind the expired Sobol"


def test_cancelling_a_stream_stops_its_work_and_frees_the_worker(
    client: SaliencyClient,
    samples,  # type: ignore[no-untyped-def]
) -> None:
    import time

    data = samples[7][0]
    # ~20 s of Sobol work: only a worker that really stops lets the next call through fast.
    stream = client.explain_stream(data, methods=["sobol"], top_k=3, timeout=120)
    first = next(stream)
    assert first.WhichOneof("part") == "prediction"
    stream.cancel()  # type: ignore[attr-defined]
    with pytest.raises(grpc.RpcError) as caught:
        next(stream)
    assert caught.value.code() == grpc.StatusCode.CANCELLED
    start = time.perf_counter()
    assert client.explain(data, methods=["vanilla_gradient"], timeout=30).explanations
    elapsed = time.perf_counter() - start
    assert elapsed < 8.0, f"next request waited {elapsed:.1f}s behind the cancelled Sobol"


def test_torchserve_keeps_worker_output_but_no_access_log(
    torchserve, client: SaliencyClient
) -> None:  # type: ignore[no-untyped-def]
    client.model_info()  # at least one request through the frontend
    logs = torchserve.run_dir / "logs"
    # The handler's start-up line (worker stdout, INFO) reaches the model log...
    model_log = (logs / "model_log.log").read_text()
    assert "saliency handler ready" in model_log and "rows per pass" in model_log
    # ...with the CPU quota split between the fixture's two workers.
    assert f", {max(1, cpu_quota() // 2)} threads," in model_log
    # ...and no request is written to an access log.
    access = logs / "access_log.log"
    assert not access.exists() or "shapes" not in access.read_text()
