"""The input convolution: phase-split input gradient and folded normalisation (``stem``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from service.models.net import DEFAULT_TARGET_LAYER
from service.runtime.optimize import OptimizeReport, optimize_for_inference
from service.runtime.optimize.stem import (
    InputConv2d,
    Pixels,
    fold_input_convolution,
    input_convolution,
    phase_input_gradient,
    phase_kernel,
)
from service.runtime.wrap import Normalized
from tests.engine.nets import TinyCnn
from tests.runtime.test_optimize import default_architecture

# (kernel, stride, padding, dilation, input height, input width)
GEOMETRIES = [
    (3, 1, 1, 1, 9, 9),
    (3, 2, 1, 1, 16, 16),  # the default model's stem
    (3, 2, 1, 1, 15, 12),  # odd and non-square: the last phase is short
    (7, 2, 3, 1, 20, 22),  # ResNet's 7x7/2 stem
    (4, 3, 0, 1, 17, 14),  # stride 3, no padding, a cut-off last window
    (3, 2, 2, 2, 13, 13),  # dilated
    (5, 1, 0, 1, 8, 11),
]


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: "k{}s{}p{}d{}_{}x{}".format(*g))
def test_phase_gradient_equals_autograd_in_float64(geometry: tuple[int, ...]) -> None:
    k, s, p, d, h, w = geometry
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn((6, 3, k, k), generator=gen, dtype=torch.float64)
    x = torch.randn((2, 3, h, w), generator=gen, dtype=torch.float64, requires_grad=True)
    y = F.conv2d(x, weight, stride=s, padding=p, dilation=d)
    grad_out = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    (want,) = torch.autograd.grad(y, x, grad_out)
    kernel, q_max = phase_kernel(weight, s, (p, p), (d, d))
    got = phase_input_gradient(grad_out, kernel, q_max, s, (h, w))
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_input_conv_folds_normalisation_and_matches_in_float64() -> None:
    gen = torch.Generator().manual_seed(1)
    conv = nn.Conv2d(3, 8, 3, stride=2, padding=1).double()
    mean = torch.tensor([0.4, 0.5, 0.6], dtype=torch.float64)
    std = torch.tensor([0.2, 0.25, 0.3], dtype=torch.float64)
    folded = InputConv2d(conv, mean, std)
    x = torch.rand((2, 3, 11, 10), generator=gen, dtype=torch.float64, requires_grad=True)

    def reference(x: torch.Tensor) -> torch.Tensor:
        return conv((x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1))

    want, got = reference(x), folded(x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    grad_out = torch.randn(want.shape, generator=gen, dtype=torch.float64)
    (grad_want,) = torch.autograd.grad(want, x, grad_out)
    (grad_got,) = torch.autograd.grad(got, x, grad_out)
    torch.testing.assert_close(grad_got, grad_want, rtol=1e-12, atol=1e-12)
    assert not list(folded.parameters())  # frozen by construction: buffers only


def test_input_convolution_found_behind_the_normalisation() -> None:
    model = default_architecture()
    assert input_convolution(model, torch.rand(1, 3, 32, 32)) == "model.features.0.0"
    # TinyCnn normalises inside its own forward: the first convolution sees a tensor the
    # model made, which a hook cannot tie to the pixels, so nothing is replaced.
    assert input_convolution(TinyCnn(), torch.rand(1, 3, 24, 24)) is None


def test_input_used_twice_is_refused_by_the_check() -> None:
    class Skip(nn.Module):  # the pixels feed the convolution and, again, the head
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.head = nn.Linear(4 + 3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            features = torch.cat([F.relu(self.conv(x)), x], dim=1).mean(dim=(2, 3))
            return self.head(features)

    model = Normalized(Skip().eval(), [0.5] * 3, [0.25] * 3)
    report = OptimizeReport()
    optimized = optimize_for_inference(model, (3, 8, 8), input_conv=True, report=report)
    assert report.input_conv is None
    assert any("input convolution kept" in note for note in report.notes)
    assert isinstance(optimized, Normalized)


def test_optimiser_replaces_the_stem_and_keeps_every_name() -> None:
    model = default_architecture()
    report = OptimizeReport()
    optimized = optimize_for_inference(
        model, (3, 64, 64), keep=[DEFAULT_TARGET_LAYER], input_conv=True, report=report
    )
    assert report.input_conv == "model.features.0.0"
    assert isinstance(optimized, Pixels)
    assert isinstance(optimized.get_submodule("model.features.0.0"), InputConv2d)
    assert [n for n, _ in optimized.named_modules()] == [n for n, _ in model.named_modules()]
    x = torch.rand(3, 3, 64, 64, requires_grad=True)
    logits = model(x)
    (want,) = torch.autograd.grad(logits[:, 1].sum(), x)
    (got,) = torch.autograd.grad(optimized(x)[:, 1].sum(), x)
    torch.testing.assert_close(optimized(x), logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


def test_fold_leaves_a_plain_model_wrapperless() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.Flatten(), nn.LazyLinear(2))
    net(torch.rand(1, 3, 8, 8))  # materialise the lazy layer
    name = input_convolution(net, torch.rand(1, 3, 8, 8))
    assert name == "0"
    folded = fold_input_convolution(net, name)
    assert folded is net and isinstance(net[0], InputConv2d)


def test_input_conv_gradient_under_bfloat16_autocast() -> None:
    gen = torch.Generator().manual_seed(2)
    conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
    mean, std = torch.tensor([0.5] * 3), torch.tensor([0.25] * 3)
    folded = InputConv2d(conv, mean, std)
    x = torch.rand((2, 3, 16, 16), generator=gen, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = folded(x)
        (got,) = torch.autograd.grad(out.float().sum(), x)
    (want,) = torch.autograd.grad(conv((x - 0.5) / 0.25).sum(), x)
    assert out.dtype == torch.bfloat16 and got.dtype == torch.float32
    assert float((got - want).abs().max()) <= 1e-2 * float(want.abs().max())
