"""Grad-CAM++ against the paper's equations in float64; layer lookup and detection."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import jvp, vmap

from service.engine.engine import Engine
from service.engine.errors import InvalidInputError, UnsupportedMethodError
from service.engine.layer_finder import find_cam_layer
from service.engine.layers import capture_activations, resolve_layer
from tests.engine.conftest import ModelCase
from tests.engine.nets import CNN_LAYER, SIZE, TinyCnn, all_hooks, images

# pytorch-grad-cam's stabiliser, which the method keeps: 1e-6 added to the denominator of
# eq. 19 written in derivatives of S. It is not negligible next to small gradients (it
# moves the maps by ~1 % on CamNet), so the reference applies it too, in Y = exp(S) terms.
STABILISER = 1e-6


def paper_gradcam_pp(
    head: Callable[[torch.Tensor], torch.Tensor], acts: torch.Tensor, target: int
) -> torch.Tensor:
    """Grad-CAM++ of one image from Chattopadhay et al. 2018, eqs. 7, 10 and 17, in float64.

    ``Y = exp(S_target)`` as a function of the layer's activations ``A`` (``head`` maps
    ``(1, K, h, w)`` activations to logits). Its first, second and third derivatives
    ``Y1, Y2, Y3`` with respect to each ``A_kij`` come from autograd (forward mode along
    each coordinate), not from the closed form the method uses, and enter eq. 10 as they
    are::

        alpha_kij = Y2 / (2 Y2 + sum_ab A_kab Y3)      (0 where Y2 = 0)
        w_k = sum_ij alpha_kij ReLU(Y1)
        L = ReLU(sum_k w_k A_k)

    ``Y1`` carries the positive factor ``exp(S)`` into every ``w_k``; the authors' code and
    ours drop it, so ``L`` is divided by ``exp(S)`` here. Returns ``(h, w)`` float64.

    Paper: https://arxiv.org/abs/1710.11063
    """

    def y(a: torch.Tensor) -> torch.Tensor:
        return torch.exp(head(a[None])[0, target])

    def along(f: Callable[[torch.Tensor], torch.Tensor], e: torch.Tensor) -> Callable[..., Any]:
        return lambda a: jvp(f, (a,), (e,))[1]  # the derivative of f along e

    def derivatives(e: torch.Tensor) -> tuple[torch.Tensor, ...]:
        y1 = along(y, e)
        y2 = along(y1, e)
        y3 = along(y2, e)
        return y1(acts), y2(acts), y3(acts)

    n = acts.numel()
    coordinates = torch.eye(n, dtype=acts.dtype).view(n, *acts.shape)
    y1, y2, y3 = (d.view(acts.shape) for d in vmap(derivatives)(coordinates))
    exp_s = y(acts)
    denominator = 2 * y2 + acts.sum(dim=(1, 2), keepdim=True) * y3 + STABILISER * exp_s
    alpha = torch.where(y2 != 0, y2 / denominator, torch.zeros_like(y2))
    weights = (alpha * F.relu(y1)).sum(dim=(1, 2), keepdim=True)
    return F.relu((weights * acts).sum(dim=0)) / exp_s


class CamNet(nn.Module):
    """Small CNN whose head after the CAM layer (``stem``) is not linear: a ReLU conv, then
    average pooling and a linear layer, so the layer gradient varies from pixel to pixel."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU())
        self.head_conv = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(6, 3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        self.eval()

    def logits_from(self, acts: torch.Tensor) -> torch.Tensor:
        return self.fc(self.head_conv(acts).mean(dim=(2, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits_from(self.stem(x))


Split = tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]


def tiny_cnn_split(model: nn.Module) -> Split:
    """TinyCnn cut at its CAM layer (``features.2``, the last block): before and after."""
    assert isinstance(model, TinyCnn)
    return (
        lambda x: model.features((x - 0.45) / 0.25),
        lambda a: model.classifier(model.pool(a).flatten(1)),
    )


def cam_net_split(model: nn.Module) -> Split:
    assert isinstance(model, CamNet)
    return model.stem, model.logits_from


# torch.func's forward mode goes through torch.jit.script internally in torch 2.13.
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize(
    ("net", "layer", "size", "split"),
    [(TinyCnn, CNN_LAYER, SIZE, tiny_cnn_split), (CamNet, "stem", 16, cam_net_split)],
    ids=["tiny_cnn", "nonlinear_head"],
)
def test_grad_cam_pp_matches_the_papers_equations(
    net: Callable[[], nn.Module], layer: str, size: int, split: Callable[[nn.Module], Split]
) -> None:
    model = net()
    engine = Engine(model, target_layer=layer, input_shape=(3, size, size))
    x = images(3, seed=9, size=size)
    targets = [1, 2, 0]
    ours = engine.explain(x, targets, "grad_cam_pp").maps
    before, after = split(copy.deepcopy(model).double())
    for b, target in enumerate(targets):
        with torch.no_grad():
            acts = before(x[b : b + 1].double())[0]
        cam = paper_gradcam_pp(after, acts, target)
        ref = F.interpolate(cam[None, None], size=(size, size), mode="bilinear")[0, 0]
        scale = float(ref.abs().max())
        assert scale > 0
        torch.testing.assert_close(ours[b].double(), ref, rtol=1e-5, atol=1e-6 * scale)


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


def test_find_cam_layer() -> None:
    model = TinyCnn()
    # The block's ReLU made the last spatial tensor; the containers only pass it on.
    assert find_cam_layer(model, (3, SIZE, SIZE)).name == "features.2.2"
    assert all_hooks(model) == []
    engine = Engine(model, target_layer="auto", input_shape=(3, SIZE, SIZE))
    assert engine.target_layer is model.features.get_submodule("2.2")


def test_find_cam_layer_follows_inplace_changes_and_skips_1x1() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.Sequential(nn.Conv2d(4, 4, 3), nn.ReLU(inplace=True)),
        nn.AdaptiveAvgPool2d(1),  # 1x1: not spatial
        nn.Flatten(),
        nn.Linear(4, 2),
    )
    assert find_cam_layer(model, (3, 16, 16)).name == "1.1"


def test_without_a_cam_layer_cam_methods_are_unavailable_and_say_why() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 2))
    with pytest.raises(UnsupportedMethodError):
        find_cam_layer(model, (3, 2, 2))
    assert all_hooks(model) == []
    engine = Engine(model, target_layer="auto", input_shape=(3, 2, 2))
    with pytest.raises(UnsupportedMethodError, match="unavailable for this model: no CAM layer"):
        engine.explain(torch.rand(1, 3, 2, 2), [0], "grad_cam")
    engine.explain(torch.rand(1, 3, 2, 2), [0], "vanilla_gradient")  # the rest still runs


def test_detected_layer_of_the_default_model_gives_its_cam(default_case: ModelCase) -> None:
    """Auto-detection lands on the configured CAM layer or a module with the same output."""
    model = default_case.model
    detected = find_cam_layer(model, default_case.input_shape).name
    x = images(1, size=default_case.input_shape[-1])
    outputs = []
    for name in (detected, default_case.target_layer):
        with torch.no_grad(), capture_activations(resolve_layer(model, name)) as capture:
            model(x)
        outputs.append(capture.single())
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)
    assert all_hooks(model) == []
