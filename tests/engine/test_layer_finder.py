"""The CAM layer finder on real architectures and on the traps that fooled the old one.

Expected answers are known by construction of each model: torchvision/timm layouts for the
zoo, and small models built here around one trap each (a 4-D tensor the head never reads,
a shared activation instance, a class-token head, no feature map at all).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from service.engine.cam_layer import CamLayer, tokens_to_map
from service.engine.errors import InvalidInputError, UnsupportedMethodError
from service.engine.layer_finder import describe_layer, find_cam_layer
from service.engine.layers import capture_activations, resolve_layer
from service.engine.modules import freeze
from service.models.zoo import IMAGENET_MEAN, IMAGENET_STD, ZOO, vit_sdpa
from service.runtime.wrap import Normalized
from tests.engine.nets import all_hooks

SIZE = 64

# name, kind, grid, channels, prefix tokens, batch first: for the tiny configurations at
# 64 px (CNNs downsample by 32; ViTs have 8 px patches) and the full ones at 224 px.
TINY = {
    "resnet18": ("model.layer4.0", "spatial", (2, 2), 64, 0, True),
    "resnet50": ("model.layer4.0", "spatial", (2, 2), 256, 0, True),
    "efficientnet_b0": ("model.features.8", "spatial", (2, 2), 320, 0, True),
    "convnext_tiny": ("model.stages.3.blocks.0", "spatial", (2, 2), 64, 0, True),
    # class-token head: the last block's own output gives patch tokens no gradient
    "vit_s16": ("model.blocks.1.norm1", "tokens", (8, 8), 32, 1, False),
    # average-pooled head over the patch tokens: the last block's output; 1 class + 4 registers
    "vit_s16_sdpa_reg4": ("model.blocks.1", "tokens", (8, 8), 32, 5, True),
}
FULL = {
    "resnet18": ("model.layer4.1", "spatial", (7, 7), 512, 0, True),
    "resnet50": ("model.layer4.2", "spatial", (7, 7), 2048, 0, True),
    "efficientnet_b0": ("model.features.8", "spatial", (7, 7), 1280, 0, True),
    "convnext_tiny": ("model.stages.3.blocks.2", "spatial", (7, 7), 768, 0, True),
    "vit_s16": ("model.blocks.11.norm1", "tokens", (14, 14), 384, 1, False),
    "vit_s16_sdpa_reg4": ("model.blocks.11", "tokens", (14, 14), 384, 5, True),
}
# The name a user would know for the same tensor (torchvision's ``layer4``, timm's ``stages.3``).
ALSO = {"resnet50": "model.layer4", "resnet18": "model.layer4", "convnext_tiny": "model.stages.3"}


def served(net: nn.Module) -> nn.Module:
    """As the engine sees a model: pixel space, frozen, eval mode."""
    return freeze(Normalized(net, IMAGENET_MEAN, IMAGENET_STD))


def layer_fields(layer: CamLayer) -> tuple[object, ...]:
    return (
        layer.name,
        layer.kind,
        layer.grid,
        layer.channels,
        layer.prefix_tokens,
        layer.batch_first,
    )


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_tiny(name: str) -> None:
    model = served(ZOO[name]("tiny", 5, SIZE, 0))
    layer = find_cam_layer(model, (3, SIZE, SIZE))
    assert layer_fields(layer) == TINY[name]
    assert layer.name in layer.how and f"{layer.grid[0]}x{layer.grid[1]}" in layer.how
    if name in ALSO:
        assert ALSO[name] in layer.same_output
    assert all_hooks(model) == []
    # The layer runs once per forward, its output reshapes to the grid, and every cell of
    # that grid gets a gradient from the logits: a CAM there is not blank anywhere.
    x = torch.rand(2, 3, SIZE, SIZE)
    layer_module = resolve_layer(model, layer.name)
    with torch.enable_grad(), capture_activations(layer_module, leaf=True) as capture:
        logits = model(x)
        activations = capture.single()
        (grad,) = torch.autograd.grad(logits[:, 1].sum(), activations)
    assert layer.to_map(activations).shape == (2, layer.channels, *layer.grid)
    assert float(layer.to_map(grad).abs().amax(dim=1).min()) > 0  # every cell has a gradient


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_full(name: str) -> None:
    model = served(ZOO[name]("full", 1000, 224, 0))
    assert layer_fields(find_cam_layer(model, (3, 224, 224))) == FULL[name]


def test_grid_follows_a_non_square_input() -> None:
    for name, grid in (("vit_s16", (8, 12)), ("vit_s16_sdpa_reg4", (8, 12)), ("resnet50", (2, 3))):
        model = served(ZOO[name]("tiny", 5, (64, 96), 0))
        assert find_cam_layer(model, (3, 64, 96)).grid == grid, name


def test_class_token_head_steps_back_to_the_last_norm_before_attention() -> None:
    """timm-style blocks with a class-token head: ``blocks.1.norm1``, not the wider ``qkv``.

    The last block's output (and its attention and MLP outputs) reach the logits only
    through the class token, so their patch tokens have no gradient; the first norm feeds
    the keys and values the class token attends to. ``attn.qkv`` also has patch gradients
    but is 3x wider than the model's tokens: not a map of its features.
    """
    net = vit_sdpa.build("tiny", 5, SIZE, 0, reg_tokens=0, global_pool="token")
    model = served(net)
    layer = find_cam_layer(model, (3, SIZE, SIZE))
    assert layer_fields(layer) == ("model.blocks.1.norm1", "tokens", (8, 8), 32, 1, True)
    assert "model.blocks.1" in layer.how and "prefix tokens only" in layer.how
    # Independently: the last block's output really gives the patch tokens a zero gradient.
    x = torch.rand(1, 3, SIZE, SIZE)
    with torch.enable_grad(), capture_activations(net.blocks[1], leaf=True) as capture:
        logits = model(x)
        (grad,) = torch.autograd.grad(logits.sum(), capture.single())
    assert float(grad[:, 1:].abs().max()) == 0.0 and float(grad[:, 0].abs().max()) > 0


class AuxiliaryAfterFeatures(nn.Module):
    """Computes a 4-D map after its features that the head never reads, and an SE-style gate.

    The old finder answered ``aux`` (the last 4-D output); the head reads ``features``,
    scaled by a 1x1 gate computed from them.
    """

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.gate = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(8, 8, 1), nn.Sigmoid())
        self.aux = nn.Conv2d(8, 1, 1)  # e.g. a map kept for a loss, or for display
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 3)
        self.last_aux: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x)
        h = h * self.gate(h)
        self.last_aux = self.aux(h.detach())
        return self.fc(self.pool(h).flatten(1))  # type: ignore[no-any-return]


def test_a_later_four_d_tensor_the_head_does_not_read_is_not_chosen() -> None:
    model = AuxiliaryAfterFeatures().eval()
    layer = find_cam_layer(model, (3, 16, 16))
    assert (layer.name, layer.kind, layer.grid, layer.channels) == (
        "features.1",
        "spatial",
        (16, 16),
        8,
    )
    assert layer.same_output == ("features",)


class SharedActivation(nn.Module):
    """One ``SiLU`` instance for every block; ``enclosed`` puts the last one inside a block.

    Enclosed: the head reads ``head_block``'s output, produced by the shared act: the answer
    is the enclosing ``head_block``. Not enclosed: the top-level ``forward`` applies the
    shared act, and no module that runs once returns what the head reads: the answer is
    the map the act was applied to, ``head_norm``.
    """

    def __init__(self, enclosed: bool) -> None:
        super().__init__()
        self.act = nn.SiLU()
        self.blocks = nn.Sequential(
            nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), self.act),
            nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), self.act),
        )
        self.head_conv = nn.Conv2d(4, 6, 1)
        self.head_norm = nn.BatchNorm2d(6)
        self.enclosed = enclosed
        self.head_block = nn.Sequential(self.head_conv, self.head_norm, self.act)
        self.fc = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(x)
        # The same three modules either way: inside their block, or called from here.
        h = self.head_block(h) if self.enclosed else self.act(self.head_norm(self.head_conv(h)))
        return self.fc(h.mean(dim=(2, 3)))  # type: ignore[no-any-return]


@pytest.mark.parametrize(("enclosed", "expected"), [(True, "head_block"), (False, "head_norm")])
def test_shared_activation_is_never_the_layer(enclosed: bool, expected: str) -> None:
    model = SharedActivation(enclosed).eval()
    layer = find_cam_layer(model, (3, 8, 8))
    assert (layer.name, layer.grid, layer.channels) == (expected, (8, 8), 6)
    assert "act (runs 3 times per forward)" in layer.how
    with torch.no_grad(), capture_activations(resolve_layer(model, layer.name)) as capture:
        model(torch.rand(1, 3, 8, 8))
    assert capture.single().shape == (1, 6, 8, 8)  # CAM's "runs exactly once" holds


@pytest.mark.parametrize(
    ("model", "size"),
    [
        (nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2)), 8),
        (nn.Sequential(nn.Conv2d(3, 4, 8, stride=8), nn.Flatten(), nn.Linear(4, 2)), 8),  # 1x1
    ],
    ids=["mlp", "map_of_one_cell"],
)
def test_no_spatial_map_and_no_tokens_is_a_clear_error(model: nn.Module, size: int) -> None:
    with pytest.raises(UnsupportedMethodError, match=r"no CAM layer.*CAM methods are unavailable"):
        find_cam_layer(model, (3, size, size))
    assert all_hooks(model) == []


class Raises(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.norm = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.norm(self.conv(x))
        raise RuntimeError("model failed after its features")


def test_hooks_removed_and_modes_restored_when_the_model_raises() -> None:
    model = Raises().train()
    with pytest.raises(RuntimeError, match="model failed"):
        find_cam_layer(model, (3, 8, 8))
    assert all_hooks(model) == []
    assert model.training and model.norm.training


def test_probe_leaves_a_training_model_untouched() -> None:
    model = SharedActivation(enclosed=True).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    find_cam_layer(model, (3, 8, 8))
    assert all(m.training for m in model.modules())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key  # batch-norm statistics did not move


@pytest.mark.parametrize("name", list(ZOO))
def test_a_given_layer_is_described_as_the_finder_would(name: str) -> None:
    """The finder's answer, given by name, is checked and described the same way."""
    model = served(ZOO[name]("tiny", 5, SIZE, 0))
    found = find_cam_layer(model, (3, SIZE, SIZE))
    given = describe_layer(model, found.name, (3, SIZE, SIZE))
    assert layer_fields(given) == layer_fields(found) and given.chosen == "given"
    assert found.chosen == "found" and given.how.startswith(f"given: {found.name}")
    if name in ALSO:  # the name a user knows for the same tensor
        also = describe_layer(model, ALSO[name], (3, SIZE, SIZE))
        assert (also.kind, also.grid, also.channels) == (found.kind, found.grid, found.channels)
    assert all_hooks(model) == []


@pytest.mark.parametrize(
    ("name", "layer", "error", "match"),
    [
        ("resnet18", "model.layer9", InvalidInputError, r"no layer named 'model\.layer9'"),
        (
            "efficientnet_b0",
            "model.features.0.2",
            UnsupportedMethodError,
            r"runs \d+ times per forward",
        ),
        ("resnet18", "model.fc", UnsupportedMethodError, r"outputs \(1, 5\): neither a spatial"),
        # class-token head: the last block's patch tokens never reach the logits
        ("vit_s16", "model.blocks.1", UnsupportedMethodError, "patch tokens .* do not reach"),
    ],
    ids=["missing", "shared_activation", "logits", "blank_tokens"],
)
def test_a_given_layer_that_cannot_be_a_cam_layer_is_refused_with_the_reason(
    name: str, layer: str, error: type[Exception], match: str
) -> None:
    model = served(ZOO[name]("tiny", 5, SIZE, 0))
    with pytest.raises(error, match=match):
        describe_layer(model, layer, (3, SIZE, SIZE))
    assert all_hooks(model) == []


@pytest.mark.parametrize("batch_first", [True, False])
def test_tokens_to_map_against_an_index_loop(batch_first: bool) -> None:
    n, prefix, (gh, gw), d = 2, 3, (2, 4), 5
    tokens = torch.randn(n, prefix + gh * gw, d)
    given = tokens if batch_first else tokens.transpose(0, 1).contiguous()
    grid = tokens_to_map(given, (gh, gw), prefix, batch_first=batch_first)
    assert grid.shape == (n, d, gh, gw)
    for b in range(n):
        for i in range(gh):
            for j in range(gw):
                assert torch.equal(grid[b, :, i, j], tokens[b, prefix + i * gw + j])


def test_tokens_to_map_refuses_a_wrong_length() -> None:
    with pytest.raises(UnsupportedMethodError, match="11 tokens do not hold 1 prefix"):
        tokens_to_map(torch.zeros(1, 11, 4), (3, 3), 1)
    with pytest.raises(UnsupportedMethodError, match=r"expected tokens \(N, T, D\)"):
        tokens_to_map(torch.zeros(1, 4, 3, 3), (3, 3), 0)


def test_cam_layer_round_trips_through_json() -> None:
    layer = find_cam_layer(served(ZOO["vit_s16"]("tiny", 5, SIZE, 0)), (3, SIZE, SIZE))
    assert CamLayer.from_json(layer.to_json()) == layer
    with pytest.raises(ValueError, match="kind"):
        CamLayer.from_json({**layer.to_json(), "kind": "volume"})
