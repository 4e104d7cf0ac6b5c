"""Shared fixtures: a tiny CNN for fast checks, and the project's default model."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from service.engine.engine import Engine
from tests.engine.nets import CNN_LAYER, SIZE, TinyCnn

# The default model is trained once and cached; tests must reuse that cache, not retrain.
os.environ.setdefault(
    "SALIENCY_SERVE_CACHE", str(Path(__file__).resolve().parents[2] / ".cache" / "saliency-serve")
)


@dataclass(frozen=True)
class ModelCase:
    """A model with what the engine needs to know about it."""

    name: str
    model: nn.Module
    target_layer: str
    input_shape: tuple[int, int, int]


@pytest.fixture(scope="session")
def tiny_case() -> ModelCase:
    return ModelCase("tiny_cnn", TinyCnn(), CNN_LAYER, (3, SIZE, SIZE))


@pytest.fixture(scope="session")
def tiny_engine(tiny_case: ModelCase) -> Engine:
    return Engine(
        tiny_case.model,
        target_layer=tiny_case.target_layer,
        input_shape=tiny_case.input_shape,
        chunk_size=7,  # deliberately odd: chunks cut through samples and items
    )


@pytest.fixture(scope="session")
def default_case() -> ModelCase:
    """The served default model (trained once into the shared cache, then loaded)."""
    from service.models.default import load_default_model

    model, meta = load_default_model()
    size = meta["input_size"]
    height, width = (size, size) if isinstance(size, int) else size[-2:]
    return ModelCase("default", model.eval(), str(meta["target_layer"]), (3, height, width))


@pytest.fixture(scope="session", params=["tiny_cnn", "default"])
def reference_case(request: pytest.FixtureRequest) -> ModelCase:
    """Models the Captum comparisons run on: the tiny CNN and the default model."""
    name = "default_case" if request.param == "default" else "tiny_case"
    return request.getfixturevalue(name)


@pytest.fixture(autouse=True)
def _no_grad_leak() -> None:
    # Tests compare against Captum, which needs grad mode on; make sure nothing left it off.
    torch.set_grad_enabled(True)
