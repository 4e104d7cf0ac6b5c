"""Small models for engine tests (the default model is loaded in ``conftest.py``)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from service.engine.registry import MethodSpec
from service.runtime.export import export_onnx as export_model_onnx
from service.runtime.onnx_forward import OnnxForward

SIZE = 24
NUM_CLASSES = 5
CNN_LAYER = "features.2"


def _block(c_in: int, c_out: int, stride: int, act: type[nn.Module]) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        act(),
    )


class TinyCnn(nn.Module):
    """Pixel-space CNN shaped like the default model: normalisation inside, BN, GAP head.

    Class 0 gets a large negative bias so that it is never the predicted class: a test of
    "default target = predicted class" then cannot pass by accident with class 0.
    """

    def __init__(self, seed: int = 0, act: type[nn.Module] = nn.ReLU) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.features = nn.Sequential(
            _block(3, 8, 2, act), _block(8, 16, 1, act), _block(16, 16, 1, act)
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(16, NUM_CLASSES)
        self.explode = False  # set to make forward raise after the CAM layer
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    assert m.running_mean is not None and m.running_var is not None
                    m.running_mean.uniform_(-0.2, 0.2, generator=gen)
                    m.running_var.uniform_(0.5, 2.0, generator=gen)
            self.classifier.bias[0] = -50.0
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features((x - 0.45) / 0.25)
        if self.explode:
            raise RuntimeError("model failed after the target layer")
        return self.classifier(self.pool(h).flatten(1))


def cnn_methods(specs: Iterable[MethodSpec]) -> list[MethodSpec]:
    """The methods a CNN such as :class:`TinyCnn` can run: all but those that read
    attention, which ``tests/engine/test_zoo_contract.py`` holds to the same contract on
    the zoo's transformers."""
    return [spec for spec in specs if not spec.needs_attention]


def images(n: int, seed: int = 0, size: int = SIZE) -> torch.Tensor:
    """``n`` float32 images in ``[0, 1]`` with some structure (smooth blobs plus noise)."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand((n, 3, 4, 4), generator=gen)
    smooth = nn.functional.interpolate(coarse, size=(size, size), mode="bilinear")
    noise = torch.rand((n, 3, size, size), generator=gen)
    return (0.7 * smooth + 0.3 * noise).clamp(0, 1)


def all_hooks(model: nn.Module) -> list[object]:
    """Every hook registered on any module of ``model``."""
    found: list[object] = []
    for m in model.modules():
        for hooks in (
            m._forward_hooks,
            m._forward_pre_hooks,
            m._backward_hooks,
            m._backward_pre_hooks,
        ):
            found.extend(hooks.values())
    return found


def export_onnx(model: nn.Module, path: Path, size: int) -> OnnxForward:
    """``model`` exported to ``path`` as an archive ships it, opened in ONNX Runtime."""
    return OnnxForward(export_model_onnx(model, (3, size, size), path))
