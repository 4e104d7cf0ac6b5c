"""Every zoo architecture, and a user's model with its own code and requirements, served end
to end: ``archive`` (parity, CAM layer and attention found), one real TorchServe holding
every archive of one store, the real gateway in front, a real gRPC client.

The user's model (``tests/integration/byom``) is a vit-pytorch-style ViT whose file imports
einops, which the server's environment does not have: TorchServe installs it from the
archive's requirements into the model's own venv, under the server's pinned packages. A
second TorchServe shows that pin holding: a requirement that would replace one of the
server's packages makes the model's install fail.
"""

from __future__ import annotations

import io
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from PIL import Image

from service.archive import BatchConfig, build_archive
from service.client import SaliencyClient
from service.engine.registry import METHODS
from service.launcher import TorchServe, TorchServePorts
from service.models.zoo import IMAGENET_MEAN, IMAGENET_STD, ZOO, eager_spec
from service.stack import Stack, running_stack
from tests.engine.zoo_cases import CLASSES, SIZE, cheap_params

pytestmark = pytest.mark.integration

BYOM = Path(__file__).parent / "byom"
LABELS = [f"class_{i}" for i in range(CLASSES)]
ONE_WORKER = BatchConfig(batch_size=4, max_batch_delay_ms=5, workers=1)
# The CAM layer each tiny architecture has at 64 px (tests/engine/test_layer_finder.py
# says why each is right), and the user's ViT (class-token head: the last block's
# attention norm, the latest token map whose patch tokens reach the logits).
CAM_LAYERS = {
    "resnet18": ("model.layer4.0", "spatial", 0),
    "resnet50": ("model.layer4.0", "spatial", 0),
    "efficientnet_b0": ("model.features.8", "spatial", 0),
    "convnext_tiny": ("model.stages.3.blocks.0", "spatial", 0),
    "vit_s16": ("model.blocks.1.norm1", "tokens", 1),
    "vit_s16_sdpa_reg4": ("model.blocks.1", "tokens", 5),
    "byom": ("model.blocks.1.attn.norm", "tokens", 1),
}
TRANSFORMERS = {"vit_s16", "vit_s16_sdpa_reg4", "byom"}


def archive_byom(out: Path, requirements: Path, say: Any = None) -> Path:
    return build_archive(
        name="byom",
        eager={"module": "einops_vit.py", "class": "ViT", "kwargs": {"num_classes": CLASSES}},
        exported=None,
        labels=LABELS,
        input_size=(3, 32, 32),
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        target_layer=None,
        out_dir=out,
        files=[BYOM / "einops_vit.py", BYOM / "vitparts"],
        requirements=requirements,
        batch=ONE_WORKER,
        say=say,
    )


@pytest.fixture(scope="module")
def said() -> dict[str, list[str]]:
    return {}


@pytest.fixture(scope="module")
def zoo_stack(
    tmp_path_factory: pytest.TempPathFactory, said: dict[str, list[str]]
) -> Iterator[Stack]:
    """One store with every zoo archive and the user's, served by one TorchServe."""
    store = tmp_path_factory.mktemp("zoo-store")
    for name in ZOO:
        said[name] = []
        build_archive(
            name=name,
            eager=eager_spec(name, "tiny", CLASSES, SIZE),
            exported=None,
            labels=LABELS,
            input_size=(3, SIZE, SIZE),
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            target_layer=None,
            out_dir=store,
            batch=ONE_WORKER,
            say=said[name].append,
        )
    said["byom"] = []
    archive_byom(store, BYOM / "requirements.txt", said["byom"].append)
    models = {name: f"{name}.mar" for name in [*ZOO, "byom"]}
    run_dir = tmp_path_factory.mktemp("zoo-run")  # kept: its logs
    with running_stack(store, models, run_dir, ready_timeout=900) as stack:
        yield stack


@pytest.fixture(scope="module")
def client(zoo_stack: Stack) -> Iterator[SaliencyClient]:
    with SaliencyClient(zoo_stack.gateway.address) as connected:
        yield connected


def png(side: int, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


SERVED = [*ZOO, "byom"]


@pytest.mark.parametrize("name", SERVED)
def test_archive_said_which_cam_layer_it_found_and_why(
    zoo_stack: Stack, said: dict[str, list[str]], name: str
) -> None:
    layer = CAM_LAYERS[name][0]
    first = next(line for line in said[name] if line.startswith("CAM layer:"))
    assert first.startswith(f"CAM layer: {layer.removeprefix('model.')} (")
    assert "found automatically (" in first and first.endswith("override with --target-layer")
    attention = next(line for line in said[name] if line.startswith("attention:"))
    if name in TRANSFORMERS:
        assert attention.startswith("attention: 2 self-attention layers")
    else:
        assert attention.startswith("attention: none, so attention methods are unavailable")


@pytest.mark.parametrize("name", SERVED)
def test_model_info_lists_the_cam_layer_and_every_method_it_can_run(
    client: SaliencyClient, name: str
) -> None:
    info = client.model_info(name)
    assert info.model.name == name
    layer, kind, prefix = CAM_LAYERS[name]
    assert (info.cam_layer.name, info.cam_layer.kind, info.cam_layer.prefix_tokens) == (
        layer,
        kind,
        prefix,
    )
    assert info.cam_layer.chosen == "found" and info.target_layer == layer
    assert [m.name for m in info.methods] == METHODS.names()
    for method in info.methods:
        needs_attention = METHODS.get(method.name).needs_attention
        runs = name in TRANSFORMERS or not needs_attention
        assert method.available == runs and bool(method.reason) == (not runs), method.name
    assert bool(info.attention) == (name in TRANSFORMERS)


@pytest.mark.parametrize("name", SERVED)
def test_every_available_method_explains_through_the_gateway(
    client: SaliencyClient, name: str
) -> None:
    info = client.model_info(name)
    side = info.height
    image = png(side + 8, seed=len(name))  # resized to the model's input by the server
    for method in (m for m in info.methods if m.available):
        params = cheap_params(METHODS.get(method.name))
        reply = client.explain(image, methods=[(method.name, params)], model=name, top_k=1)
        assert not reply.error.code, (method.name, reply.error.message)
        assert reply.model.name == name and len(reply.explanations) == 1, method.name
        explanation = reply.explanations[0]
        assert (explanation.map.height, explanation.map.width) == (side + 8, side + 8)
        assert explanation.target == reply.predictions[0].index


@pytest.mark.parametrize("method", ["attention_rollout", "gradient_weighted_attention"])
def test_a_method_the_model_cannot_run_is_refused_with_the_reason(
    client: SaliencyClient, method: str
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        client.explain(png(SIZE), methods=[method], model="resnet50")
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "unavailable for this model: no attention layers" in str(caught.value.details())


def test_the_users_requirements_were_installed_for_that_model_alone(zoo_stack: Stack) -> None:
    """einops is not in the server's environment; the model's venv got it from PyPI."""
    server_has = subprocess.run(
        [sys.executable, "-c", "import einops"], capture_output=True, check=False
    )
    assert server_has.returncode != 0, "einops is installed in the server's venv: no proof"
    log = (zoo_stack.torchserve.run_dir / "logs" / "ts_log.log").read_text()
    assert "Created virtual environment for model byom" in log
    assert "Installed custom pip packages for model byom" in log


def test_a_requirement_that_would_replace_a_server_package_fails_that_model(
    tmp_path: Path,
) -> None:
    """TorchServe's per-model pip inherits PIP_CONSTRAINT: the server's pins hold.

    ``packaging`` is one of the server's packages (the archive checks only the torch
    family); another version of it conflicts with the constraint, so the model's install
    fails and the model is not served, while the server itself stays up.
    """
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("einops\npackaging==23.2\n")
    store = tmp_path / "store"
    archive_byom(store, requirements)
    run_dir = tmp_path / "run"
    server = TorchServe(store, {"byom": "byom.mar"}, run_dir, TorchServePorts.free())
    server.start()
    try:
        log = run_dir / "logs" / "ts_log.log"
        deadline = time.monotonic() + 300
        text = ""
        while time.monotonic() < deadline and "installation failed" not in text:
            time.sleep(1)
            text = log.read_text() if log.exists() else ""
        assert "Custom pip package installation failed for model byom" in text
        assert "The user requested (constraint) packaging==" in text  # pip's own words
        assert server.process is not None and server.process.poll() is None
        assert not server.ready()  # the frontend answers, but byom has no worker
    finally:
        server.stop()
