"""The HTTP/JSON API and ``explain --html`` against the real stack (TorchServe + gateway):
the answers are the gRPC API's, bad input is refused with its status, and the server
keeps serving."""

from __future__ import annotations

import base64
import io
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from service.client import SaliencyClient, decode_map
from service.stack import RunningGateway

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "docs" / "example-shape.png"


def instance(data: bytes) -> dict[str, object]:
    return {"image": {"b64": base64.b64encode(data).decode()}}


@pytest.fixture(scope="module")
def http(gateway: RunningGateway) -> httpx.Client:
    return httpx.Client(base_url=gateway.http_url, timeout=120)


def predict_count(gateway: RunningGateway, code: str) -> float:
    """``Predict`` calls in the gateway's latency histogram, from its /metrics page."""
    with urllib.request.urlopen(gateway.metrics_url, timeout=10) as page:
        text = page.read().decode()
    labels = {"method": "Predict", "model": "shapes", "code": code}
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "saliency_request_duration_seconds_count" and sample.labels == labels
    )


def test_predict_and_explain_answer_as_grpc_does(
    http: httpx.Client, client: SaliencyClient, gateway: RunningGateway, samples
) -> None:  # type: ignore[no-untyped-def]
    images = [samples[0][0], samples[1][0]]
    before = predict_count(gateway, "OK")
    reply = http.post(
        "/v1/models/shapes:predict",
        json={"instances": [instance(d) for d in images], "parameters": {"top_k": 3}},
    )
    assert reply.status_code == 200, reply.text
    for data, answer in zip(images, reply.json()["predictions"], strict=True):
        expected = client.predict(data, top_k=3).predictions
        assert [c["index"] for c in answer["classes"]] == [p.index for p in expected]
        got = [c["probability"] for c in answer["classes"]]
        np.testing.assert_allclose(got, [p.probability for p in expected], atol=1e-4)
    assert predict_count(gateway, "OK") >= before + 2 + 2  # HTTP's two, then gRPC's two

    reply = http.post(
        "/v1/models/shapes:explain",
        json={"instances": [instance(images[0])], "parameters": {"methods": ["grad_cam"]}},
    )
    assert reply.status_code == 200, reply.text
    item = reply.json()["explanations"][0]["explanations"][0]
    with Image.open(io.BytesIO(base64.b64decode(item["map"]["b64"]))) as png:
        levels = np.asarray(png).astype(np.float64)
    with Image.open(io.BytesIO(images[0])) as original:
        assert levels.shape == (original.height, original.width)  # at the image's resolution
    low, high = item["map"]["value_min"], item["map"]["value_max"]
    ours = low + levels / 255.0 * (high - low)
    theirs = decode_map(client.explain(images[0], methods=["grad_cam"]).explanations[0].map)
    step = (high - low) / 255.0  # one 8-bit level: batch-order rounding may cross one
    assert np.abs(ours - theirs).max() <= step * 1.01 + 1e-6


def test_bytes_that_are_no_image_are_400_and_the_server_keeps_serving(
    http: httpx.Client, samples
) -> None:  # type: ignore[no-untyped-def]
    reply = http.post("/v1/models/shapes:explain", json={"instances": [instance(b"GIF89a...")]})
    assert reply.status_code == 400
    assert reply.json()["error"]["code"] == "INVALID_ARGUMENT"
    ok = http.post("/v1/models/shapes:predict", json={"instances": [instance(samples[2][0])]})
    assert ok.status_code == 200


def test_a_deadline_is_504_and_the_server_keeps_serving(http: httpx.Client, samples) -> None:  # type: ignore[no-untyped-def]
    slow = {"methods": [{"name": "rise", "params": {"n_masks": 4000}}]}
    reply = http.post(
        "/v1/models/shapes:explain?timeout=0.2",
        json={"instances": [instance(samples[3][0])], "parameters": slow},
    )
    assert reply.status_code == 504, reply.text
    assert reply.json()["error"]["code"] == "DEADLINE_EXCEEDED"
    ok = http.post("/v1/models/shapes:predict", json={"instances": [instance(samples[3][0])]})
    assert ok.status_code == 200


def test_explain_html_writes_a_report_of_the_call(
    gateway: RunningGateway, client: SaliencyClient, tmp_path: Path
) -> None:
    report = tmp_path / "report.html"
    done = subprocess.run(
        [
            sys.executable, "-m", "service.cli", "explain", str(EXAMPLE),
            "--method", "grad_cam", "--method", "smoothgrad", "--mask", "grabcut",
            "--score", "deletion_auc", "--address", gateway.address,
            "--out", str(tmp_path / "pngs"), "--html", str(report),
        ],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    text = report.read_text()
    label = client.predict(EXAMPLE.read_bytes(), top_k=1).predictions[0].label
    assert label in text and "grad_cam" in text and "smoothgrad" in text
    sources = re.findall(r'<img src="([^"]+)"', text)
    assert len(sources) == 1 + 2 * 3  # the image; per map: overlay, map, mask
    assert all(s.startswith("data:image/png;base64,") for s in sources)
    assert "deletion_auc" in text
