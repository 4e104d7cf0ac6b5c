"""Shared fixtures of the default-model tests: one trained model for the whole session."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

# Same default as the Makefile, so every suite (and `make serve`) shares one trained model.
os.environ.setdefault(
    "SALIENCY_SERVE_CACHE", str(Path(__file__).resolve().parents[2] / ".cache" / "saliency-serve")
)


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The cached default model's directory; trains it (a few minutes) on first use."""
    from service.models.default import ensure_default_model

    return ensure_default_model(progress=True)


@pytest.fixture(scope="session")
def default_model(default_model_dir: Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """``(model, meta)`` of the default model, frozen, in pixel space."""
    from service.models.default import load_default_model

    return load_default_model(default_model_dir)
