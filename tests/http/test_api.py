"""The HTTP/JSON API end to end over real HTTP and real gRPC, TorchServe faked.

What reaches the model worker is compared with what the test sent (the image's bytes,
names turned into the wire enums), and what comes back with what the worker answered
(maps' and masks' bytes, names for numbers): the HTTP layer is a translation, and these
are its two directions.
"""

from __future__ import annotations

import base64
import json

import httpx

from service._proto.saliency.v1 import saliency_pb2 as pb
from service.gateway.server import Gateway
from service.protocol.names import MASKS, METHODS, SCORES
from tests.gateway.fake_torchserve import Script
from tests.gateway.support import MODEL, calls
from tests.http.conftest import IMAGE, body

MAP_PNG = b"8-bit png bytes of a map"
MASK_PNG = b"1-bit png bytes of a mask"


def explain_reply() -> pb.ExplainResponse:
    return pb.ExplainResponse(
        model=pb.ModelRef(name=MODEL, version="3"),
        predictions=[pb.Prediction(index=2, label="ring", probability=0.75)],
        explanations=[
            pb.Explanation(
                method=METHODS.number("grad_cam"),  # type: ignore[arg-type]
                target=2,
                target_label="ring",
                map=pb.SaliencyMap(
                    width=4,
                    height=3,
                    encoding=pb.MAP_ENCODING_PNG8,
                    data=MAP_PNG,
                    value_min=-0.5,
                    value_max=2.0,
                ),
                mask=pb.Mask(width=4, height=3, kind=MASKS.number("grabcut"), png=MASK_PNG),  # type: ignore[arg-type]
                box=pb.Box(x_min=0, y_min=1, x_max=3, y_max=2),
                scores=[pb.ScoreValue(score=SCORES.number("deletion_auc"), value=0.125)],  # type: ignore[arg-type]
                params={"relu": "true"},
                seconds=0.5,
            )
        ],
        timings=[pb.StageTiming(stage="total", seconds=0.75)],
    )


def test_explain_sends_the_request_the_json_asks_for_and_returns_its_reply(
    gateway: Gateway, http: httpx.Client, script: Script
) -> None:
    script.unary["request"] = lambda _: explain_reply().SerializeToString()
    reply = http.post(
        f"/v1/models/{MODEL}:explain",
        json=body(
            methods=["grad_cam", {"name": "integrated_gradients", "params": {"n_steps": 8}}],
            mask={"name": "grabcut", "params": {"foreground_quantile": 0.9}},
            scores=["deletion_auc"],
            targets=[2],
            seed=7,
        ),
    )
    assert reply.status_code == 200, reply.text
    sent = pb.ExplainRequest.FromString(script.received[0].input["request"])
    assert sent.model == MODEL and sent.image.encoded == IMAGE
    assert [m.method for m in sent.methods] == [
        METHODS.number("grad_cam"),
        METHODS.number("integrated_gradients"),
    ]
    assert dict(sent.methods[1].params) == {"n_steps": "8"}
    assert sent.mask.kind == MASKS.number("grabcut")
    assert dict(sent.mask.params) == {"foreground_quantile": "0.9"}
    assert list(sent.scores) == [SCORES.number("deletion_auc")]
    assert list(sent.target_classes) == [2] and sent.seed == 7

    (instance,) = reply.json()["explanations"]
    assert instance["model"] == {"name": MODEL, "version": "3"}
    assert instance["classes"] == [{"index": 2, "label": "ring", "probability": 0.75}]
    assert instance["timings"] == {"total": 0.75}
    (item,) = instance["explanations"]
    assert item["method"] == "grad_cam" and item["target_label"] == "ring"
    assert base64.b64decode(item["map"]["b64"]) == MAP_PNG
    assert (item["map"]["value_min"], item["map"]["value_max"]) == (-0.5, 2.0)
    assert item["map"]["encoding"] == "png8"
    assert base64.b64decode(item["mask"]["b64"]) == MASK_PNG
    assert item["mask"]["kind"] == "grabcut"
    assert item["box"] == {"x_min": 0, "y_min": 1, "x_max": 3, "y_max": 2}
    assert item["scores"] == {"deletion_auc": 0.125}
    assert item["params"] == {"relu": "true"} and item["completeness_error"] is None


def test_predict_answers_every_instance_in_order(
    gateway: Gateway, http: httpx.Client, script: Script
) -> None:
    def answer(request: object) -> bytes:
        sent = pb.PredictRequest.FromString(request.input["predict"])  # type: ignore[attr-defined]
        label = sent.image.encoded.decode()
        top = pb.Prediction(index=len(label), label=label, probability=1.0)
        return pb.PredictResponse(predictions=[top] * sent.top_k).SerializeToString()

    script.unary["predict"] = answer
    images = [b"first", b"second image", b"third"]
    reply = http.post(
        f"/v1/models/{MODEL}:predict",
        json={
            "instances": [{"image": {"b64": base64.b64encode(i).decode()}} for i in images],
            "parameters": {"top_k": 2},
        },
    )
    assert reply.status_code == 200, reply.text
    predictions = reply.json()["predictions"]
    assert [p["classes"][0]["label"] for p in predictions] == ["first", "second image", "third"]
    assert all(len(p["classes"]) == 2 for p in predictions)
    assert calls(gateway, "Predict", "OK", expect=3) == 3


def test_models_are_listed_and_described_from_the_registries(
    gateway: Gateway, http: httpx.Client, script: Script
) -> None:
    info = pb.ModelInfo(
        model=pb.ModelRef(name=MODEL, version="3"),
        labels=["disc", "ring"],
        channels=3,
        height=64,
        width=64,
        methods=[
            pb.MethodInfo(
                method=METHODS.number("grad_cam"),  # type: ignore[arg-type]
                name="grad_cam",
                available=False,
                params=[pb.ParamInfo(name="relu", type="bool", default="true")],
            )
        ],
        masks=[pb.MaskInfo(kind=MASKS.number("threshold"), name="threshold")],  # type: ignore[arg-type]
    )
    script.unary["model_info"] = lambda _: info.SerializeToString()
    assert http.get("/v1/models").json() == {"models": [MODEL]}
    described = http.get(f"/v1/models/{MODEL}").json()
    assert described["name"] == MODEL and described["ready"] is True
    assert described["labels"] == ["disc", "ring"]
    assert described["input"] == {"channels": 3, "height": 64, "width": 64}
    (method,) = described["methods"]
    assert method["name"] == "grad_cam" and method["available"] is False
    assert method["params"] == [
        {
            "name": "relu",
            "type": "bool",
            "default": "true",
            "minimum_exclusive": False,
            "maximum_exclusive": False,
            "choices": [],
            "doc": "",
        }
    ]  # every field, set or not (bounds only when the parameter has them)
    assert [m["name"] for m in described["masks"]] == ["threshold"]
    assert described["defaults"]["method"] in METHODS.names()
    assert calls(gateway, "GetModelInfo", "OK") == 1


def test_an_unknown_method_is_refused_before_any_call(
    gateway: Gateway, http: httpx.Client, script: Script
) -> None:
    reply = http.post(f"/v1/models/{MODEL}:explain", json=body(methods=["telepathy"]))
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert error["code"] == "INVALID_ARGUMENT"
    assert "telepathy" in error["message"] and "grad_cam" in error["message"]
    assert script.received == []


def test_json_bodies_are_parsed_strictly() -> None:
    from service.gateway.http.kserve import parse_json
    from service.protocol.errors import InvalidInputError

    for text in (b"NaN", b'{"a": Infinity}', b"[" * 100_000, b"1" * 5000, b"{"):
        try:
            parse_json(text)
        except InvalidInputError as exc:
            assert "not JSON" in str(exc) and len(str(exc)) < 200
        else:
            raise AssertionError(f"{text[:20]!r} was accepted")
    assert json.loads(b'{"a": 1}') == parse_json(b'{"a": 1}')
