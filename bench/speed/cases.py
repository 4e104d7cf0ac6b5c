"""The models measured, as a user would hand them over, and what was measured on each."""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bench.resnet import TARGET_LAYER as RESNET_LAYER
from bench.resnet import resnet18_pixels
from bench.speed import BATCH
from service.runtime.optimize import OptimizeReport


@dataclass
class Case:
    """A model to benchmark, as a user would hand it over."""

    key: str
    title: str
    model: nn.Module  # pixel space, eval mode, parameters as loaded
    input_shape: tuple[int, int, int]
    target_layer: str
    inputs: torch.Tensor  # (BATCH, C, H, W) in [0, 1]


@dataclass
class CaseResult:
    case: Case
    times: dict[str, list[float]] = field(default_factory=dict)
    ratios: dict[str, list[float]] = field(default_factory=dict)
    batch_of: dict[str, int] = field(default_factory=dict)
    report: OptimizeReport = field(default_factory=OptimizeReport)
    chunk_size: int = 0
    chunk_times: dict[int, float] = field(default_factory=dict)
    captum_search: dict[str, dict[int, float]] = field(default_factory=dict)
    captum_best: dict[str, int] = field(default_factory=dict)
    activation_bytes: dict[str, int] = field(default_factory=dict)
    setup_seconds: dict[str, float] = field(default_factory=dict)


def resnet_case() -> Case:
    model = resnet18_pixels()
    model.requires_grad_(True)  # as torch hands a model over: parameters require grad
    return Case(
        "resnet18",
        "ResNet-18 layout (plain torch, random weights), 3x224x224",
        model,
        (3, 224, 224),
        RESNET_LAYER,
        random_images(BATCH, 224),
    )


def random_images(batch: int, side: int) -> torch.Tensor:
    """``(batch, 3, side, side)`` in ``[0, 1]``: smooth blobs plus a little pixel noise
    (image-like, so nothing is all-noise), the same on every run."""
    gen = torch.Generator().manual_seed(0)
    coarse = torch.rand((batch, 3, 7, 7), generator=gen)
    smooth = nn.functional.interpolate(coarse, size=(side, side), mode="bilinear")
    return (0.8 * smooth + 0.2 * torch.rand((batch, 3, side, side), generator=gen)).clamp(0, 1)


def default_case() -> Case:
    """The default model if its trained cache exists (no training here), else its architecture."""
    from service.models import synthetic
    from service.models.net import DEFAULT_TARGET_LAYER, SaliencyNet
    from service.runtime.wrap import Normalized

    size = synthetic.IMAGE_SIZE
    title = f"default model (SaliencyNet, trained weights), 3x{size}x{size}"
    model: nn.Module | None = None
    try:
        from service.models import default

        directory = default.cache_dir()
        if (directory / default.META_FILE).is_file() and (
            directory / default.WEIGHTS_FILE
        ).is_file():
            model, meta = default.load_default_model()
            size = int(meta["input_size"][-1])
            title = f"default model (SaliencyNet, trained weights), 3x{size}x{size}"
    except Exception as error:  # a cache being written right now, or an older layout
        print(f"default model not loaded ({type(error).__name__}: {error})", flush=True)
        model = None
    if model is None:
        torch.manual_seed(0)
        model = Normalized(SaliencyNet(len(synthetic.CLASS_NAMES)), [0.5] * 3, [0.25] * 3)
        title = f"default model architecture (SaliencyNet, untrained: no cache), 3x{size}x{size}"
    model.eval().requires_grad_(True)
    batch = synthetic.generate(BATCH, seed=12345, size=size)
    inputs = torch.from_numpy(batch.images.astype(np.float32) / 255.0).permute(0, 3, 1, 2)
    return Case("default", title, model, (3, size, size), DEFAULT_TARGET_LAYER, inputs.contiguous())


def export_onnx(model: nn.Module, input_shape: tuple[int, int, int], directory: Path) -> Path:
    """``model.onnx`` exactly as an archive ships it (``export_artifacts``, parity checked)."""
    from service.runtime.export import export_artifacts

    quiet = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(quiet):
        warnings.simplefilter("ignore")
        return export_artifacts(model, input_shape, directory).onnx_path
