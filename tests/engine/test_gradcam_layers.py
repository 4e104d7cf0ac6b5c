"""Grad-CAM++ against pytorch-grad-cam's formulas in float64; layer lookup and detection."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from service.engine.engine import Engine
from service.engine.errors import InvalidInputError, UnsupportedMethodError
from service.engine.layers import capture_activations, find_last_spatial_layer, resolve_layer
from tests.engine.conftest import ModelCase
from tests.engine.nets import CNN_LAYER, SIZE, TinyCnn, all_hooks, images


def gradcam_pp_reference(
    model: nn.Module, layer_name: str, x: torch.Tensor, targets: list[int]
) -> torch.Tensor:
    """pytorch-grad-cam's GradCAMPlusPlus weights, in float64 numpy, then ReLU + bilinear."""
    model64 = copy.deepcopy(model).double()
    store: dict[str, torch.Tensor] = {}
    layer = resolve_layer(model64, layer_name)
    handle = layer.register_forward_hook(lambda _m, _i, out: store.update(a=out))
    try:
        x64 = x.double().requires_grad_(True)
        logits = model64(x64)
        score = logits[torch.arange(len(targets)), torch.tensor(targets)].sum()
        grads = torch.autograd.grad(score, store["a"])[0].numpy()
    finally:
        handle.remove()
    activations = store["a"].detach().numpy()
    grads_power_2 = grads**2
    grads_power_3 = grads_power_2 * grads
    sum_activations = np.sum(activations, axis=(2, 3))
    aij = grads_power_2 / (
        2 * grads_power_2 + sum_activations[:, :, None, None] * grads_power_3 + 0.000001
    )
    aij = np.where(grads != 0, aij, 0)
    weights = np.sum(np.maximum(grads, 0) * aij, axis=(2, 3))
    cam = np.maximum((weights[:, :, None, None] * activations).sum(axis=1), 0)
    up = F.interpolate(torch.from_numpy(cam)[:, None], size=x.shape[-2:], mode="bilinear")
    return up[:, 0]


def test_grad_cam_pp_matches_reference(tiny_engine: Engine) -> None:
    x = images(3, seed=9)
    targets = [1, 4, 2]
    ours = tiny_engine.explain(x, targets, "grad_cam_pp").maps
    ref = gradcam_pp_reference(tiny_engine.model, CNN_LAYER, x, targets)
    scale = float(ref.abs().max())
    assert scale > 0
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-6 * scale)


class InplaceAfterLayer(nn.Module):
    """The CAM layer's output is overwritten in place by the next module."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.relu(self.conv(x)).mean(dim=(2, 3)))


@pytest.mark.parametrize("method", ["grad_cam", "grad_cam_pp"])
def test_cam_sees_the_layer_output_not_a_later_inplace_change(method: str) -> None:
    model = InplaceAfterLayer()
    engine = Engine(model, target_layer="conv", input_shape=(3, 8, 8))
    x = images(2, size=8)
    ours = engine.explain(x, [0, 1], method).maps
    plain = copy.deepcopy(model)
    plain.relu = nn.ReLU(inplace=False)
    reference = Engine(plain, target_layer="conv", input_shape=(3, 8, 8))
    torch.testing.assert_close(ours, reference.explain(x, [0, 1], method).maps)


def test_capture_ignores_other_threads_and_is_removed() -> None:
    import threading

    layer = nn.Identity()
    x = torch.ones(1)
    with capture_activations(layer) as capture:
        worker = threading.Thread(target=layer, args=(x * 2,))
        worker.start()
        worker.join()
        layer(x)
    assert len(capture.activations) == 1 and capture.activations[0] is x
    assert not layer._forward_hooks


def test_layer_that_runs_twice_is_rejected() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(self.conv(x)).mean(dim=(2, 3))

    model = Twice()
    engine = Engine(model, target_layer="conv", input_shape=(3, 8, 8))
    with pytest.raises(UnsupportedMethodError, match="2 times"):
        engine.explain(images(1, size=8), [0], "grad_cam")
    assert all_hooks(model) == []


def test_resolve_layer() -> None:
    model = TinyCnn()
    assert resolve_layer(model, "features.2.0") is model.features.get_submodule("2.0")
    with pytest.raises(InvalidInputError, match=r"no layer named 'features\.9'.*features\.2\.0"):
        resolve_layer(model, "features.9")
    with pytest.raises(InvalidInputError):
        resolve_layer(model, "")
    with pytest.raises(InvalidInputError):
        Engine(model, target_layer="nope", input_shape=(3, SIZE, SIZE))


def test_find_last_spatial_layer() -> None:
    model = TinyCnn()
    # The block's ReLU made the last spatial tensor; the containers only pass it on.
    assert find_last_spatial_layer(model, (3, SIZE, SIZE)) == "features.2.2"
    assert all_hooks(model) == []
    engine = Engine(model, target_layer="auto", input_shape=(3, SIZE, SIZE))
    assert engine.target_layer is model.features.get_submodule("2.2")


def test_find_last_spatial_layer_follows_inplace_changes_and_skips_1x1() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.Sequential(nn.Conv2d(4, 4, 3), nn.ReLU(inplace=True)),
        nn.AdaptiveAvgPool2d(1),  # 1x1: not spatial
        nn.Flatten(),
        nn.Linear(4, 2),
    )
    assert find_last_spatial_layer(model, (3, 16, 16)) == "1.1"


def test_find_last_spatial_layer_without_one() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 2))
    with pytest.raises(UnsupportedMethodError):
        find_last_spatial_layer(model, (3, 2, 2))
    assert all_hooks(model) == []


def test_detected_layer_of_the_default_model_gives_its_cam(default_case: ModelCase) -> None:
    """Auto-detection lands on the configured CAM layer or a module with the same output."""
    model = default_case.model
    detected = find_last_spatial_layer(model, default_case.input_shape)
    x = images(1, size=default_case.input_shape[-1])
    outputs = []
    for name in (detected, default_case.target_layer):
        with torch.no_grad(), capture_activations(resolve_layer(model, name)) as capture:
            model(x)
        outputs.append(capture.single())
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)
    assert all_hooks(model) == []
