"""The light client against the live gateway: asyncio, and the CLI from a venv without torch."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from service.client import AsyncSaliencyClient, SaliencyClient, decode_map, domain_error
from service.protocol.errors import InvalidInputError
from service.protocol.events import EventKind, event_kind
from tests.integration.conftest import RunningGateway

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def test_async_client_answers_as_the_blocking_one(
    gateway: RunningGateway, client: SaliencyClient, samples: list[tuple[bytes, int, object]]
) -> None:
    data, label, _ = samples[3]

    async def calls() -> tuple[object, ...]:
        async with AsyncSaliencyClient(gateway.address) as aio:
            info = await aio.model_info()
            reply = await aio.explain(data, methods=["smoothgrad"], seed=11)
            parts = [
                p
                async for p in aio.explain_stream(
                    data, methods=["grad_cam"], scores=["insertion_auc"]
                )
            ]
            prediction = await aio.predict(data, top_k=2)
        return info, reply, parts, prediction

    info, reply, parts, prediction = asyncio.run(calls())
    assert [m.name for m in info.masks] == [m.name for m in client.model_info().masks]  # type: ignore[attr-defined]
    blocking = client.explain(data, methods=["smoothgrad"], seed=11)
    # Same request, same seed: the same map, up to the float rounding of whatever batch
    # TorchServe happened to form (rows are summed in another order).
    ours = decode_map(reply.explanations[0].map)  # type: ignore[attr-defined]
    theirs = decode_map(blocking.explanations[0].map)
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4 * float(np.abs(theirs).max()))
    kinds = [event_kind(p) for p in parts]  # type: ignore[attr-defined]
    assert kinds == [EventKind.PREDICTION, EventKind.EXPLANATION, EventKind.SCORES, EventKind.DONE]
    assert [p.index for p in prediction.predictions][:1] == [label]  # type: ignore[attr-defined]


def test_a_refused_request_becomes_the_domain_error(client: SaliencyClient, samples) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as err:
        client.explain(samples[0][0], methods=[("smoothgrad", {"n_samples": "0"})])
    error = domain_error(err.value)
    assert isinstance(error, InvalidInputError) and "n_samples" in str(error)


@pytest.fixture(scope="module")
def light_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv with the base install only: the repo's client dependencies, no torch."""
    venv = tmp_path_factory.mktemp("light") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    env = {**os.environ, "PIP_CONSTRAINT": str(REPO / "constraints.txt")}
    env.pop("PYTHONPATH", None)
    subprocess.run(
        [str(venv / "bin" / "pip"), "install", "--quiet", "-e", str(REPO)],
        check=True,
        env=env,
        timeout=600,
    )
    probe = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import torch"], capture_output=True, timeout=60
    )
    assert probe.returncode != 0, "the base install pulled torch"
    return venv


def test_cli_explain_runs_from_a_venv_without_torch(
    light_venv: Path,
    gateway: RunningGateway,
    samples: list[tuple[bytes, int, object]],
    tmp_path: Path,
) -> None:
    data, _, _ = samples[4]
    image = tmp_path / "shape.png"
    image.write_bytes(data)
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [
            str(light_venv / "bin" / "saliency-serve"),
            "explain",
            str(image),
            "--method", "grad_cam",
            "--method", "integrated_gradients",
            "--param", "integrated_gradients.n_steps=8",
            "--mask", "grabcut",
            "--score", "deletion_auc",
            "--address", gateway.address,
            "--out", str(out),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "deletion_auc=" in result.stdout and "completeness=" in result.stdout
    with Image.open(image) as source:
        size = source.size
    written = sorted(p.name for p in out.iterdir())
    overlays = [n for n in written if n.endswith(".png") and not n.endswith("_mask.png")]
    assert len(overlays) == 3 and "overview.png" in overlays  # two maps and the overview
    assert sum(n.endswith("_mask.png") for n in written) == 2
    for name in written:
        with Image.open(out / name) as png:
            png.load()
            expected = (size[0] * 3, size[1]) if name == "overview.png" else size
            assert png.size == expected, name
