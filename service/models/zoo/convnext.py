"""ConvNeXt-T (Liu et al. 2022, https://arxiv.org/abs/2201.03545) in plain torch.

Module names follow timm's ``convnext_tiny``: ``stem`` (4x4 patchify + LayerNorm),
``stages.0`` ... ``stages.3`` (each a ``downsample`` and ``blocks``), ``head.global_pool``,
``head.norm``, ``head.fc``. A block is a 7x7 depthwise convolution, a channels-last
LayerNorm, a 4x MLP with GELU, a learned per-channel layer scale ``gamma`` and stochastic
depth (the identity in eval mode).
"""

from __future__ import annotations

import torch
from torch import nn

from service.models.zoo.common import (
    Classifier,
    DropPath,
    ImageSize,
    LayerNorm2d,
    Mlp,
    Size,
    build_seeded,
)

EPS = 1e-6


class ConvNeXtBlock(nn.Module):
    """``x + drop_path(gamma * mlp(norm(dwconv7x7(x))))``."""

    def __init__(self, dim: int, drop_path: float) -> None:
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=EPS)
        self.mlp = Mlp(dim, 4 * dim)
        self.gamma = nn.Parameter(torch.full((dim,), 1e-6))  # timm's layer-scale init value
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.conv_dw(x).permute(0, 2, 3, 1)
        x = self.mlp(self.norm(x)).permute(0, 3, 1, 2)
        x = x.mul(self.gamma.reshape(1, -1, 1, 1))
        return self.drop_path(x) + shortcut


class ConvNeXtStage(nn.Module):
    """Optional downsampling (LayerNorm + 2x2 stride-2 convolution), then the blocks."""

    def __init__(self, c_in: int, c_out: int, depth: int, drop_paths: list[float]) -> None:
        super().__init__()
        self.downsample: nn.Module = nn.Identity()
        if c_in != c_out:
            self.downsample = nn.Sequential(
                LayerNorm2d(c_in, eps=EPS), nn.Conv2d(c_in, c_out, 2, stride=2)
            )
        self.blocks = nn.Sequential(*(ConvNeXtBlock(c_out, drop_paths[i]) for i in range(depth)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class Head(nn.Module):
    """Global average pool, LayerNorm over channels, linear (timm's ``NormMlpClassifierHead``)."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.norm = LayerNorm2d(dim, eps=EPS)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.norm(self.global_pool(x))))


class ConvNeXt(Classifier):
    """ConvNeXt for ``(N, 3, H, W)`` normalised images (sides multiples of 32).

    Args:
        depths: blocks per stage.
        dims: channels per stage.
        num_classes: logits.
        drop_path_rate: stochastic depth of the last block (linearly less before it).
    """

    def __init__(
        self,
        depths: tuple[int, ...],
        dims: tuple[int, ...],
        num_classes: int,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, dims[0], 4, stride=4), LayerNorm2d(dims[0], eps=EPS))
        total = sum(depths)
        rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        stages, c_in, start = [], dims[0], 0
        for depth, dim in zip(depths, dims, strict=True):
            stages.append(ConvNeXtStage(c_in, dim, depth, rates[start : start + depth]))
            c_in, start = dim, start + depth
        self.stages = nn.Sequential(*stages)
        self.num_features = dims[-1]
        self.head = Head(dims[-1], num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map ``(N, C, H/32, W/32)``."""
        return self.stages(self.stem(x))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """Logits from a feature map."""
        return self.head(features)


def build(
    size: Size = "tiny", num_classes: int = 1000, image_size: ImageSize = 224, seed: int = 0
) -> ConvNeXt:
    """ConvNeXt-T: depths ``(3, 3, 9, 3)``, dims ``(96, 192, 384, 768)`` (28.6M parameters).

    Args:
        size: ``"full"`` as published (stochastic depth 0.1 in training); ``"tiny"`` one
            block per stage, dims ``(8, 16, 32, 64)``.
        num_classes: logits.
        image_size: unused (global pooling takes any size); kept for a uniform builder.
        seed: seeds every weight.
    """
    del image_size
    if size == "full":
        return build_seeded(
            lambda: ConvNeXt((3, 3, 9, 3), (96, 192, 384, 768), num_classes, 0.1), seed
        )
    return build_seeded(lambda: ConvNeXt((1, 1, 1, 1), (8, 16, 32, 64), num_classes), seed)
