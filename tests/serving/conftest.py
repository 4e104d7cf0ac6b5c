"""A real model directory (pt2 + onnx + model.json) of a tiny network, built once."""

import json
from pathlib import Path

import pytest
import torch

from service.engine.modules import freeze
from service.runtime.artifacts import META_FILE, ModelMeta, load_bundle
from service.runtime.export import export_artifacts
from service.runtime.wrap import Normalized
from service.serving.pipeline import Explainer
from tests.serving.tiny_net import TinyNet

LABELS = ("alpha", "beta", "gamma", "delta")
SIZE = (3, 32, 32)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tiny-model")
    torch.manual_seed(0)
    net = TinyNet(len(LABELS))
    torch.save(net.state_dict(), directory / "weights.pt")
    export_artifacts(freeze(Normalized(net, (0.5,) * 3, (0.25,) * 3)), SIZE, directory)
    meta = ModelMeta(
        name="tiny",
        version="t1",
        labels=LABELS,
        input_size=SIZE,
        mean=(0.5,) * 3,
        std=(0.25,) * 3,
        target_layer="model.features.2",
        eager={
            "module": "tests.serving.tiny_net",
            "class": "TinyNet",
            "kwargs": {"num_classes": len(LABELS)},
            "weights": "weights.pt",
        },
    )
    (directory / META_FILE).write_text(json.dumps(meta.to_json()))
    return directory


@pytest.fixture(scope="session")
def explainer(tiny_model_dir: Path) -> Explainer:
    return Explainer(load_bundle(tiny_model_dir))
