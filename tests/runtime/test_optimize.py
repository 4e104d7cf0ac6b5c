"""``optimize_for_inference``: same explanations, same layer names, fewer operations."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from service.engine.engine import Engine
from service.engine.modules import freeze
from service.models.net import DEFAULT_TARGET_LAYER, SaliencyNet
from service.runtime.optimize import (
    OptimizeReport,
    activation_bytes_per_image,
    choose_chunk_size,
    optimize_for_inference,
)
from service.runtime.wrap import Normalized
from tests.engine.nets import CNN_LAYER, SIZE, TinyCnn, images

RTOL = 1e-4
METHODS = ("vanilla_gradient", "integrated_gradients", "grad_cam")
DEFAULT_SIZE = 128


def default_architecture() -> nn.Module:
    """The default model's architecture, random weights and non-trivial batch-norm stats."""
    torch.manual_seed(0)
    net = SaliencyNet(num_classes=6)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.BatchNorm2d):
                assert module.running_mean is not None and module.running_var is not None
                module.weight.uniform_(0.5, 1.5, generator=gen)
                module.bias.normal_(0.0, 0.2, generator=gen)
                module.running_mean.normal_(0.0, 0.2, generator=gen)
                module.running_var.uniform_(0.5, 2.0, generator=gen)
    return Normalized(net, [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]).eval()


CASES = {
    "tiny_cnn": (TinyCnn, CNN_LAYER, SIZE),
    "default_architecture": (default_architecture, DEFAULT_TARGET_LAYER, DEFAULT_SIZE),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    scale = float(expected.abs().max())
    error = float((actual.float() - expected.float()).abs().max())
    assert error <= RTOL * scale, f"{what}: max |diff| {error:.3g} > {RTOL} x {scale:.3g}"


@pytest.mark.parametrize("input_conv", [False, True], ids=["no_stem", "stem"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_explanations_unchanged(case: str, channels_last: bool, input_conv: bool) -> None:
    make, layer, size = CASES[case]
    model = make()
    report = OptimizeReport()
    optimized = optimize_for_inference(
        model,
        (3, size, size),
        keep=[layer],
        channels_last=channels_last,
        input_conv=input_conv,
        report=report,
    )
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert len(report.folded) == n_bn, report.notes
    assert report.channels_last is channels_last
    shape = (3, size, size)
    before = Engine(model, target_layer=layer, input_shape=shape, chunk_size=5)
    after = Engine(optimized, target_layer=layer, input_shape=shape, chunk_size=5)
    inputs = images(3, seed=7, size=size)
    targets = before.predict_logits(inputs).argmax(dim=1)
    assert_close(after.predict_logits(inputs), before.predict_logits(inputs), "logits")
    for method in METHODS:
        want = before.explain(inputs, targets, method, {"n_steps": 8} if "integ" in method else {})
        got = after.explain(inputs, targets, method, {"n_steps": 8} if "integ" in method else {})
        assert_close(got.maps, want.maps, method)
        if want.completeness_error is not None:
            assert got.completeness_error is not None


def test_names_kept_and_batch_norm_gone() -> None:
    model = default_architecture()
    optimized = optimize_for_inference(model, (3, 64, 64), keep=[DEFAULT_TARGET_LAYER])
    names_before = [n for n, _ in model.named_modules()]
    assert [n for n, _ in optimized.named_modules()] == names_before
    assert not any(isinstance(m, nn.BatchNorm2d) for m in optimized.modules())
    assert isinstance(optimized.get_submodule("model.features.0.1"), nn.Identity)
    assert not any(p.requires_grad for p in optimized.parameters())
    assert not optimized.training


def test_original_left_alone() -> None:
    model = TinyCnn()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.requires_grad_(True)
    optimize_for_inference(model, (3, SIZE, SIZE), channels_last=False)
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_kept_convolution_not_folded() -> None:
    # CAM on the convolution itself must see its raw output, not the batch-normed one.
    model = TinyCnn()
    report = OptimizeReport()
    optimized = optimize_for_inference(
        model, (3, SIZE, SIZE), keep=["features.1.0"], channels_last=False, report=report
    )
    assert ("features.1.0", "features.1.1") not in report.folded
    assert isinstance(optimized.get_submodule("features.1.1"), nn.BatchNorm2d)
    assert len(report.folded) == 2


class SkipFromConv(nn.Module):
    """A convolution whose output feeds a batch norm *and* a residual sum: not foldable."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 3)
        with torch.no_grad():
            assert self.bn.running_mean is not None and self.bn.running_var is not None
            self.bn.running_mean.fill_(0.3)
            self.bn.running_var.fill_(2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        h = torch.relu(self.bn(h)) + h
        return self.head(h.mean(dim=(2, 3)))


def test_fold_refused_when_the_function_would_change() -> None:
    model = SkipFromConv().eval()
    report = OptimizeReport()
    optimized = optimize_for_inference(model, (3, 8, 8), channels_last=False, report=report)
    assert report.folded == []
    assert report.notes and "not folded" in report.notes[0]
    inputs = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(optimized(inputs), model(inputs), atol=1e-6)


def test_shared_batch_norm_not_folded() -> None:
    conv_a, conv_b, bn = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.bn = conv_a, conv_b, bn

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (self.bn(self.a(x)) + self.bn(self.b(x))).mean(dim=(2, 3))

    report = OptimizeReport()
    optimize_for_inference(Shared().eval(), (3, 4, 4), channels_last=False, report=report)
    assert report.folded == []


def test_activation_memory_drops() -> None:
    model = default_architecture()
    optimized = optimize_for_inference(model, (3, 64, 64), channels_last=False)
    before = activation_bytes_per_image(freeze(model), (3, 64, 64))
    after = activation_bytes_per_image(optimized, (3, 64, 64))
    assert 0 < after < before


def test_chunk_size_is_a_candidate() -> None:
    best, per_row = choose_chunk_size(TinyCnn(), (3, SIZE, SIZE), candidates=(2, 4), repeats=1)
    assert best in (2, 4)
    assert set(per_row) == {2, 4}
    assert all(t > 0 for t in per_row.values())
