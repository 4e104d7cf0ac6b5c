"""``VisualizeClass`` and ``VisualizeClassStream`` through the real stack: clients (blocking
and asyncio), gateway, TorchServe, the handler and the default model; and the CLI."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from service.cli import main
from service.client import AsyncSaliencyClient, SaliencyClient, decode_map, decode_rgb
from service.launcher import TorchServe
from service.stack import gateway_options, running_gateway
from tests.integration.conftest import RunningGateway

pytestmark = pytest.mark.integration
FAST = {"steps": 8, "crops": 2}


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_visualisation_is_seeded_and_its_probability_is_the_models(
    client: SaliencyClient,
) -> None:
    first = client.visualize_class(3, params=FAST, seed=21, timeout=60)
    again = client.visualize_class(3, params=FAST, seed=21, timeout=60)
    image = decode_rgb(first.png)
    assert image.shape == (128, 128, 3)
    assert (first.target, first.target_label, first.seed) == (3, "star", 21)
    assert first.params["steps"] == "8" and first.params["crop_min"] == "0.8"
    assert first.model.version and not first.cached
    assert decode_map(first.transparency).shape == (128, 128)
    # Not asserted: that the repeat's pixels equal these. Each of the two workers may
    # answer, and workers whose forwards round differently (layouts chosen at load) drift
    # apart under Adam, which amplifies tiny gradient differences; one worker's repeat is
    # checked below, and the same numerics' determinism in tests/serving.
    assert again.target_label == "star"
    # The probability it reports is what Predict says of the same PNG.
    predicted = client.predict(png_bytes(image), top_k=10)
    by_class = {p.index: p.probability for p in predicted.predictions}
    assert first.target_probability == pytest.approx(by_class[3], abs=1e-4)


def test_a_repeated_request_is_answered_from_the_workers_cache(
    small_torchserve: TorchServe,
) -> None:
    """One worker (the cache is per worker): the repeat must find the first's result."""
    options = gateway_options(small_torchserve)
    with running_gateway(small_torchserve.grpc_address, ["shapes"], **options) as front:
        one_worker = SaliencyClient(front.address)
        first = one_worker.visualize_class(4, params=FAST, seed=9, timeout=60)
        again = one_worker.visualize_class(4, params=FAST, seed=9, timeout=60)
        other = one_worker.visualize_class(4, params=FAST, seed=10, timeout=60)
        one_worker.close()
    assert (first.cached, again.cached, other.cached) == (False, True, False)
    assert again.png == first.png and again.transparency == first.transparency
    assert {t.stage for t in first.timings} == {"search", "total"}
    assert {t.stage for t in again.timings} == {"total"}


def test_the_stream_reports_every_step_then_the_result(client: SaliencyClient) -> None:
    parts = list(
        client.visualize_class_stream(
            5, method="gradient_ascent", params={"steps": 8}, image_every=4, seed=2, timeout=60
        )
    )
    kinds = [part.WhichOneof("part") for part in parts]
    assert kinds == ["progress"] * 8 + ["result"]
    steps = [part.progress.step for part in parts[:-1]]
    assert steps == list(range(1, 9))
    assert [p.progress.step for p in parts[:-1] if p.progress.png] == [4, 8]
    result = parts[-1].result
    assert result.target_label == "ring" and not result.transparency.data
    # The last progress image is the result (the search's final state, 8-bit PNG).
    assert np.array_equal(decode_rgb(parts[-2].progress.png), decode_rgb(result.png))


def test_the_async_client_visualises_and_streams(gateway: RunningGateway) -> None:
    async def calls() -> tuple[object, list[object]]:
        async with AsyncSaliencyClient(gateway.address) as aio:
            reply = await aio.visualize_class(1, params=FAST, seed=5)
            parts = [p async for p in aio.visualize_class_stream(1, params=FAST, seed=6)]
        return reply, parts

    reply, parts = asyncio.run(calls())
    assert reply.target_label == "square"  # type: ignore[attr-defined]
    assert parts[-1].WhichOneof("part") == "result"  # type: ignore[attr-defined]
    assert len(parts) == FAST["steps"] + 1


@pytest.mark.parametrize(
    ("options", "code", "words"),
    [
        ({"target": 10}, grpc.StatusCode.INVALID_ARGUMENT, "out of range"),
        ({"params": {"colour": "red"}}, grpc.StatusCode.INVALID_ARGUMENT, "no parameter"),
        ({"params": {"steps": -3}}, grpc.StatusCode.INVALID_ARGUMENT, "'steps'"),
        ({"model": "nope"}, grpc.StatusCode.INVALID_ARGUMENT, "unknown model"),
        (
            {"params": {"steps": 4096, "crops": 64}},
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "per-request budget",
        ),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
def test_bad_requests_get_clear_statuses(
    client: SaliencyClient,
    options: dict[str, object],
    code: grpc.StatusCode,
    words: str,
    stream: bool,
) -> None:
    options = dict(options)  # the parameter's dict is shared by both stream cases
    target = int(options.pop("target", 0))  # type: ignore[call-overload]
    with pytest.raises(grpc.RpcError) as raised:
        if stream:
            list(client.visualize_class_stream(target, timeout=30, **options))  # type: ignore[arg-type]
        else:
            client.visualize_class(target, timeout=30, **options)  # type: ignore[arg-type]
    assert raised.value.code() == code  # type: ignore[attr-defined]
    details = raised.value.details()  # type: ignore[attr-defined]
    assert words in details and len(details) < 400


def test_a_deadline_stops_a_long_search_and_harms_nothing(client: SaliencyClient) -> None:
    long = {"steps": 4096}  # a few minutes of gradient ascent on 2 cores
    with pytest.raises(grpc.RpcError) as raised:
        client.visualize_class(0, method="gradient_ascent", params=long, timeout=2)
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[attr-defined]
    # The worker stopped the search at the deadline: the next call is answered at once.
    after = client.visualize_class(0, method="gradient_ascent", params={"steps": 2}, timeout=20)
    assert after.target_label == "circle"


def test_the_cli_writes_the_image_its_progress_and_the_transparency(
    gateway: RunningGateway, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["visualize", "--class", "7", "--param", "steps=4", "--param", "crops=2"]
    argv += ["--image-every", "2", "--out", str(tmp_path), "--address", gateway.address]
    assert main(argv) == 0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [
        "maco_7_heart.png",
        "maco_7_heart_transparency.png",
        "maco_7_step0002.png",
        "maco_7_step0004.png",
    ]
    assert "class 7 (heart): p=" in capsys.readouterr().out
    assert main(["visualize", "--class", "99", "--address", gateway.address]) == 1
