"""The zoo: published sizes, seeded weights, the archive's export path and the optimiser on each.

References are the published figures of the reference implementations (torchvision's model
tables, timm's), not this code's output: parameter counts of the full configurations, and
for the CNNs multiply-accumulates at 224 px.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from service.engine.layer_finder import find_cam_layer
from service.engine.modules import freeze
from service.models.zoo import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ZOO,
    Builder,
    ImageSize,
    Size,
    efficientnet,
)
from service.runtime.export import export_artifacts
from service.runtime.optimize import OptimizeReport, optimize_for_inference
from service.runtime.wrap import Normalized

SIZE = 64
CLASSES = 7
NAMES = list(ZOO)
PARITY = 1e-4  # the archive's bound on |logit difference| between torch, .pt2 and .onnx

# torchvision's model tables (params; "GFLOPS", which are multiply-accumulates) and timm's
# vit_small_patch16_224 (22.05M). The register-token ViT adds 4 x 384 tokens and drops the
# class token's position embedding: 0.005% off ViT-S/16, well inside the 2% bound.
REFERENCE_PARAMS = {
    "resnet18": 11_689_512,
    "resnet50": 25_557_032,
    "efficientnet_b0": 5_288_548,
    "convnext_tiny": 28_589_128,
    "vit_s16": 22_050_664,
    "vit_s16_sdpa_reg4": 22_050_664,
}
REFERENCE_GMACS = {
    "resnet18": 1.81,
    "resnet50": 4.09,
    "efficientnet_b0": 0.39,
    "convnext_tiny": 4.46,
}
# Multiply-accumulates are counted for convolutions and matrix products only; torch's FLOP
# counter does not see the ViTs' fused attention, so they are checked by parameters alone.


def pixels_model(builder: Builder, size: Size = "tiny", image: int = SIZE) -> nn.Module:
    """The zoo model as it is archived: ImageNet normalisation inside, frozen, eval mode."""
    return freeze(Normalized(builder(size, CLASSES, image, 0), IMAGENET_MEAN, IMAGENET_STD))


def hardswish_b0(size: Size, num_classes: int, image_size: ImageSize, seed: int) -> nn.Module:
    return efficientnet.build(size, num_classes, image_size, seed, act="hardswish")


EXPORT_CASES = {**ZOO, "efficientnet_b0_hardswish": hardswish_b0}


@pytest.mark.parametrize("name", NAMES)
def test_tiny_shapes(name: str) -> None:
    model = ZOO[name]("tiny", CLASSES, SIZE, 0)
    assert not model.training
    x = torch.rand(2, 3, SIZE, SIZE)
    logits = model(x)
    assert logits.shape == (2, CLASSES) and logits.dtype == torch.float32
    assert bool(torch.isfinite(logits).all())
    features = model.forward_features(x)
    if name.startswith("vit"):
        prefix = int(model.num_prefix_tokens)
        assert features.shape == (2, prefix + (SIZE // 8) ** 2, model.num_features)
    else:  # every CNN here downsamples by 32
        assert features.shape == (2, model.num_features, SIZE // 32, SIZE // 32)
    torch.testing.assert_close(model.forward_head(features), logits, rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_weights_come_from_the_seed_alone(name: str) -> None:
    first = ZOO[name]("tiny", CLASSES, SIZE, 3).state_dict()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(12345)  # the global generator must not matter
        again = ZOO[name]("tiny", CLASSES, SIZE, 3).state_dict()
    other = ZOO[name]("tiny", CLASSES, SIZE, 4).state_dict()
    assert first.keys() == again.keys()
    for key, value in first.items():
        assert torch.equal(value, again[key]), key
    floats = [k for k, v in first.items() if v.is_floating_point()]
    assert floats and all(not torch.equal(first[k], other[k]) for k in floats)


def test_a_build_leaves_the_global_generator_alone() -> None:
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    for name in NAMES:
        ZOO[name]("tiny", CLASSES, SIZE, 0)
    torch.testing.assert_close(torch.rand(3), expected, rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_full_configuration_has_the_published_parameter_count(name: str) -> None:
    model = ZOO[name]("full", 1000, 224, 0)
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - REFERENCE_PARAMS[name]) <= 0.02 * REFERENCE_PARAMS[name], count


@pytest.mark.parametrize("name", list(REFERENCE_GMACS))
def test_full_cnn_has_the_published_multiply_accumulates(name: str) -> None:
    model = ZOO[name]("full", 1000, 224, 0)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.rand(1, 3, 224, 224))
    gmacs = counter.get_total_flops() / 2e9
    assert abs(gmacs - REFERENCE_GMACS[name]) <= 0.02 * REFERENCE_GMACS[name], gmacs


@pytest.mark.parametrize("name", list(EXPORT_CASES))
def test_archive_export_path_reproduces_the_logits(name: str, tmp_path: Path) -> None:
    """``export_artifacts`` (what ``archive`` runs), then both files checked independently.

    Batch 3 is neither of the sizes the exporter checks (1 and 4), so this also proves the
    batch axis of both artifacts is dynamic.
    """
    model = pixels_model(EXPORT_CASES[name])
    result = export_artifacts(model, (3, SIZE, SIZE), tmp_path, atol=PARITY)
    x = torch.rand(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(99))
    with torch.no_grad():
        expected = model(x).double().numpy()
        from_pt2 = torch.export.load(result.pt2_path).module()(x).double().numpy()
    session = ort.InferenceSession(str(result.onnx_path), providers=["CPUExecutionProvider"])
    from_onnx = session.run(["logits"], {"pixels": x.numpy()})[0].astype(np.float64)
    assert from_pt2.shape == from_onnx.shape == (3, CLASSES)
    assert float(np.abs(from_pt2 - expected).max()) <= PARITY
    assert float(np.abs(from_onnx - expected).max()) <= PARITY


@pytest.mark.parametrize("name", NAMES)
def test_optimiser_keeps_the_function_in_float64(name: str) -> None:
    """The serving optimiser's rewrites pass its float64 check, and really change nothing.

    Run on a float64 copy, so the comparison below is free of float32 rounding: a correct
    fold agrees to ~1e-13; one that changed the function would be off by orders more.
    """
    model = pixels_model(ZOO[name]).double()
    layer = find_cam_layer(model, (3, SIZE, SIZE)).name
    report = OptimizeReport()
    optimized = optimize_for_inference(
        model, (3, SIZE, SIZE), keep=[layer], channels_last=False, input_conv=True, report=report
    )
    batch_norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(report.folded) == len(batch_norms)
    assert not [note for note in report.notes if "not folded" in note or "differs" in note]
    # Only a plain convolution can become the phase-split input layer; TF-"same" cannot.
    assert (report.input_conv is None) == (name == "efficientnet_b0")
    x = torch.rand(2, 3, SIZE, SIZE, dtype=torch.float64, requires_grad=True)
    outputs = []
    for net in (model, optimized):
        captured: list[torch.Tensor] = []
        handle = net.get_submodule(layer).register_forward_hook(
            lambda _m, _a, out, store=captured: store.append(out.detach().clone())
        )
        try:
            logits = net(x)
            (grad,) = torch.autograd.grad(logits[:, 1].sum(), x)
        finally:
            handle.remove()
        outputs.append((logits.detach(), grad, captured[0]))
    for want, got in zip(outputs[0], outputs[1], strict=True):
        assert float((got - want).abs().max()) <= 1e-9 * float(want.abs().max())


def test_efficientnet_reuses_one_activation_instance() -> None:
    model = efficientnet.build("tiny", CLASSES, SIZE, 0)
    acts = {id(m) for m in model.modules() if isinstance(m, nn.SiLU)}
    assert len(acts) == 1
    calls = []
    (act,) = (m for m in model.modules() if isinstance(m, nn.SiLU))
    handle = act.register_forward_hook(lambda *_: calls.append(1))
    try:
        model(torch.rand(1, 3, SIZE, SIZE))
    finally:
        handle.remove()
    assert len(calls) > 10


def test_tf_same_padding_matches_tensorflow_output_sizes() -> None:
    """TF "same": ``ceil(in / stride)`` outputs for any input size, odd ones included."""
    conv = efficientnet.Conv2dSame(1, 1, 5, stride=2, bias=False)
    for side in (7, 8, 31, 224):
        assert conv(torch.zeros(1, 1, side, side + 1)).shape[-2:] == (
            -(-side // 2),
            -(-(side + 1) // 2),
        )
    # The extra padding pixel goes bottom/right: a one-hot kernel at the top-left tap reads
    # input row 2 * i - pad_top, with pad_top = total // 2 = 1 for 8 px, kernel 5, stride 2.
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0, 0, 0] = 1.0
        image = torch.arange(64.0).reshape(1, 1, 8, 8)
        out = conv(image)
    assert float(out[0, 0, 0, 0]) == 0.0  # padding above and left
    assert float(out[0, 0, 1, 1]) == float(image[0, 0, 1, 1])  # symmetric 2-pixel: [0, 0]
