"""A class-discriminative check that needs no trained weights: each class reads one image half.

:class:`TwoHalves` turns any zoo backbone into a two-class model whose class 0 logit is a
function of the image's left half only and class 1 of the right half only -- exactly, not
approximately. A deep CNN's receptive field spans the whole image, so masking one half of
its final feature map would not do; instead the two half-images go through the backbone
as separate items of one batch (in eval mode every item is computed on its own: batch
norm uses running statistics, layer norm and attention work per item), and only then are
their feature maps put side by side. Class 0 then reads the left half of that map and
class 1 the right, through positive weights on softplus features.

An explanation of class ``t`` is class-discriminative when its map puts its maximum and
most of its positive mass on the half class ``t`` reads (:func:`half_scores`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from service.engine.cam_layer import tokens_to_map
from service.engine.engine import Engine
from service.engine.layer_finder import find_cam_layer
from service.engine.modules import freeze
from service.models.zoo import IMAGENET_MEAN, IMAGENET_STD, ZOO, Classifier
from service.runtime.wrap import Normalized

SIZE = 64  # image side; each half is SIZE x SIZE/2
PATCH = 8  # the tiny ViTs' patch
READS = ("left", "right")  # the half class 0 and class 1 read


class HalfMasks(nn.Module):
    """``(N, C, h, w)`` -> ``(N, 2C, h, w)``: softplus features, left half then right half.

    Channels ``[0, C)`` keep the left half of the grid and are zero on the right; channels
    ``[C, 2C)`` the other way round. This is the CAM layer: a class's channels are exactly
    zero on the other half, and strictly positive on its own.
    """

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        positive = F.softplus(features)
        half = features.shape[-1] // 2
        zeros = torch.zeros_like(positive[..., half:])
        left = torch.cat([positive[..., :half], zeros], dim=-1)
        right = torch.cat([torch.zeros_like(positive[..., :half]), positive[..., half:]], dim=-1)
        return torch.cat([left, right], dim=1)


class TwoHalves(nn.Module):
    """Two classes over a zoo backbone: class 0 sees the left image half, class 1 the right.

    Args:
        backbone: a zoo model (``forward_features``) built for ``(SIZE, SIZE // 2)`` inputs.
        seed: seeds the head's positive weights.
    """

    def __init__(self, backbone: Classifier, seed: int = 0) -> None:
        super().__init__()
        self.backbone = backbone
        self.halves = HalfMasks()
        self.pool = nn.AdaptiveAvgPool2d(1)
        channels = backbone.num_features
        self.head = nn.Linear(2 * channels, 2, bias=False)
        gen = torch.Generator().manual_seed(seed)
        weight = torch.zeros(2, 2 * channels)
        weight[0, :channels] = torch.rand(channels, generator=gen) + 0.5
        weight[1, channels:] = torch.rand(channels, generator=gen) + 0.5
        with torch.no_grad():
            self.head.weight.copy_(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, width = x.shape[0], x.shape[-1]
        both = torch.cat([x[..., : width // 2], x[..., width // 2 :]], dim=0)
        features = self.backbone.forward_features(both)
        if features.dim() == 3:  # ViT tokens: the patch grid of one half-image
            prefix = int(self.backbone.num_prefix_tokens)
            grid = (x.shape[-2] // PATCH, width // 2 // PATCH)
            features = tokens_to_map(features, grid, prefix)
        side_by_side = torch.cat([features[:n], features[n:]], dim=-1)
        return self.head(self.pool(self.halves(side_by_side)).flatten(1))


def two_halves_engine(name: str, seed: int = 0) -> Engine:
    """An engine over ``TwoHalves`` on the tiny zoo model ``name``, CAM layer found for it."""
    backbone = ZOO[name]("tiny", 1, (SIZE, SIZE // 2), seed)
    model = freeze(Normalized(TwoHalves(backbone, seed), IMAGENET_MEAN, IMAGENET_STD))
    layer = find_cam_layer(model, (3, SIZE, SIZE))
    return Engine(model, target_layer=layer.name, input_shape=(3, SIZE, SIZE))


@dataclass(frozen=True)
class HalfScore:
    """Where one map puts its weight, relative to the half its class reads."""

    own_fraction: float  # share of the positive mass on the class's own half
    own_max: float  # largest value on the class's own half
    other_max: float  # largest value on the other half


def half_scores(maps: torch.Tensor, target: int) -> list[HalfScore]:
    """Per map of ``(B, H, W)``: positive mass share and maxima on class ``target``'s half."""
    half = maps.shape[-1] // 2
    own, other = (maps[..., :half], maps[..., half:])
    if READS[target] == "right":
        own, other = other, own
    scores = []
    for own_map, other_map in zip(own.double(), other.double(), strict=True):
        own_mass = float(own_map.clamp(min=0).sum())
        total = own_mass + float(other_map.clamp(min=0).sum())
        fraction = own_mass / total if total > 0 else 0.0
        scores.append(HalfScore(fraction, float(own_map.max()), float(other_map.max())))
    return scores
